"""Models trained by this project and shipped inside the package, loadable by name: `pretrained:<name>`.

Anywhere a checkpoint path is accepted (`init=`, `dmd.real=`, `cd.teacher=`, `framecast sample`, `play --ckpt`)
`pretrained:toy-base` names the folder `framecast/pretrained/toy-base/`: one framecast checkpoint (written by
`framecast convert`: safetensors weights, meta.json with its config and sampling spec) and `manifest.json`
(the recipe and command that trained it, the measured scores, the file's SHA-256). The registry below holds
the SHA-256 of every shipped weight file; resolving a name checks it, so a truncated or replaced file is one
error naming the file instead of a model that samples garbage (tests/test_pretrained.py checks it too).

How each model was made, and its scores: docs/results.md ("The pretrained toy base") for `toy-base`, the text-to-video
base the quickstart, the benchmark and the toy recipes start from, and `toy-base-v1`, its first version, kept so
the first benchmark table (2026-12-01) can be reproduced; docs/world_model.md for `minigrid`, the MiniGrid 2-step world-model student that
`framecast play --pretrained minigrid` serves (it ships with its own start views, `start/`).

A shipped model can be replaced by a better one under the same name. A run trained from it must then not pass
for a run of the new one, so a recipe stores the name *pinned* to the weights it read, `pretrained:<name>@<the
first PIN hex digits of its SHA-256>` (`pinned`, called by recipe.resolve_refs): resuming or reusing such a run
after the shipped file changed is one error naming both files (runs.py), and loading the pinned name checks it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..errors import CheckpointError

PREFIX = "pretrained:"
PIN = 12  # hex digits of the SHA-256 kept in a pinned name: 48 bits, ample to tell shipped versions apart
ROOT = Path(__file__).resolve().parent
WEIGHTS = "model.safetensors"

# name -> SHA-256 of its weights (ckpt/step_0000000/model.safetensors); update it with the file, never alone
REGISTRY: dict[str, str] = {
    "toy-base": "a2cb2ac4788ed01c5539f36446f74f97810a3fb4a3e55b7d46889c8ccf9edfd4",
    # the first toy base: docs/results.md's first benchmark table (2026-12-01) was measured from it
    "toy-base-v1": "ad4cb62436f3a7e1883c45a3ac6e763ee64f97f17df5f1507f95427fcc6df00f",
    "minigrid": "fa62f8816a19f7608f2a559729b2d69c912398737b2563f929dc873a42604573",
}

_verified: set[str] = set()


def is_name(path: str | Path) -> bool:
    return isinstance(path, str) and path.startswith(PREFIX)


def _split(path: str | Path) -> tuple[str, str]:
    """`pretrained:<name>[@<pin>]` -> (name, pin or "")."""
    name, _, pin = str(path)[len(PREFIX):].partition("@")
    return name, pin


def _name(path: str | Path) -> str:
    return _split(path)[0]


def pinned(path: str) -> str:
    """`pretrained:<name>@<pin>`: the name tied to the weights shipped now (a pinned name is returned as is)."""
    name, pin = _split(path)
    folder(name)  # an unknown name is its own error
    return path if pin else f"{PREFIX}{name}@{REGISTRY[name][:PIN]}"


def same_model(a: str, b: str) -> bool | None:
    """Whether two pretrained names are the same weights: True / False when both are pinned, None when a name
    is unpinned (stored by a framecast that did not pin), where only the names can be compared."""
    (na, pa), (nb, pb) = _split(a), _split(b)
    if na != nb:
        return False
    return pa == pb if pa and pb else None


def folder(name: str) -> Path:
    """The shipped folder of `name` (without the prefix); unknown names are one error listing the known ones."""
    if name not in REGISTRY:
        raise CheckpointError(f"no shipped model named {PREFIX}{name}; shipped: "
                              f"{', '.join(PREFIX + n for n in sorted(REGISTRY)) or 'none'}")
    return ROOT / name


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def weights_file(name: str) -> Path:
    return folder(name) / "ckpt" / "step_0000000" / WEIGHTS


def resolve(path: str) -> Path:
    """`pretrained:<name>` -> its checkpoint folder, after checking the weights' SHA-256 (once per process)."""
    name, pin = _split(path)
    w = weights_file(name)
    if pin and not REGISTRY[name].startswith(pin):
        raise CheckpointError(f"{path} names the {PREFIX}{name} whose SHA-256 starts {pin}, but the shipped "
                              f"{PREFIX}{name} is now {REGISTRY[name][:PIN]}: the shipped model was replaced "
                              f"since (its manifest.json says how the new one was made); use {PREFIX}{name} for "
                              f"the new one, or the framecast release that shipped {pin}")
    if name not in _verified:
        if not w.is_file():
            raise CheckpointError(f"{PREFIX}{name}: its weights {w} are missing (a broken install? reinstall "
                                  f"framecast, or check out the repository's file again)")
        got = sha256(w)
        if got != REGISTRY[name]:
            raise CheckpointError(f"{PREFIX}{name}: {w} has SHA-256 {got[:16]}..., the registry expects "
                                  f"{REGISTRY[name][:16]}...: the file is corrupt or was replaced")
        _verified.add(name)
    return w.parent


def start_frames(path: str | Path) -> Path | None:
    """A shipped world model's start views (`<folder>/start`: a recording of each episode's first frame, written by
    scripts/ship_pretrained.py), so `framecast play --pretrained <name>` needs no recording; None otherwise."""
    if not is_name(path):
        return None
    start = folder(_name(path)) / "start"
    return start if (start / "manifest.json").is_file() else None


def manifest(name: str) -> dict:
    """How `name` was trained and what it scored (its manifest.json)."""
    return json.loads((folder(name) / "manifest.json").read_text())
