"""Atomic, self-describing checkpoints whose every intermediate state resumes (architecture.md §5).

    <run>/ckpt/step_0000100/
        <role>.safetensors      weights of each trainable network (unwrapped: no FSDP/DDP key surgery)
        ema_<role>.safetensors  EMA weights, when kept;  obj_<name>.safetensors: an objective's extra networks
        trainer_state.pt        optimisers, step (RNG needs no saving: every step reseeds from (seed, step))
        meta.json               written last: stage, step, resolved config, sampling info, and `files`, the
                                manifest {file name: size in bytes} of every other file of the checkpoint
    <run>/ckpt/latest           a hint: the name of the newest checkpoint when it was written

Save: every file is written into `.tmp_step_N_<pid>/` and fsynced, meta.json last; the tmp folder is
fsynced, renamed to `step_N` and the parent fsynced; then `latest` is written to `.latest.tmp`, fsynced,
renamed over `latest` and the parent fsynced. A checkpoint therefore survives SIGKILL, a kernel crash and a
power loss once `save` returns.

Rule (`latest`, `resolve` and the trainer's resume use the same one): the checkpoint of a root is its newest
COMPLETE `step_*` folder, found by scanning them: meta.json parses and every file its manifest lists is present
with its size (a checkpoint from before the manifest: meta.json and the weights of the roles and EMAs it names).
The pointer is only a hint for people and other tools; newer incomplete folders are skipped with a warning
printed once per folder. So whatever a kill leaves, a re-run resumes from the newest complete checkpoint: a
stale or missing pointer is rewritten, a stale `.tmp_step_*` folder is removed (`clean`, when a run starts),
and an incomplete `step_N` is moved aside (`.corrupt_step_N`) and written again. Re-saving an existing complete
`step_N` with the same weights and meta is a no-op (the pointer is updated); with other weights it is an error.

Fault injection (tests/test_kill_resume.py): FRAMECAST_FAULT=<point>[:<nth>] SIGKILLs the process the nth
time (default: the first) it reaches <point> of a save:

    after_weights   every weights file written and fsynced in the tmp folder
    after_state     trainer_state.pt too
    after_meta      meta.json too: the tmp folder holds a whole checkpoint
    before_rename   the tmp folder fsynced, not yet renamed to step_N
    after_rename    step_N in place and its parent fsynced; `latest` still names the previous checkpoint
    during_pointer  the new pointer written and fsynced as `.latest.tmp`, not yet renamed over `latest`
    after_pointer   `latest` replaced and its folder fsynced: the save is complete
    step            the start of a training step (train/loop.py): a kill between checkpoints
"""

from __future__ import annotations

import filecmp
import json
import os
import re
import shutil
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import CheckpointError
from ..files import fsync_dir, fsync_file  # noqa: F401  (re-exported: ckpt.fsync_file)
from .. import pretrained
from . import dcp_read
from .dcp_read import CorruptCheckpoint  # noqa: F401  (re-exported)

META = "meta.json"
STATE = "trainer_state.pt"
POINTER = "latest"
FAULT_ENV = "FRAMECAST_FAULT"
FAULT_RANK_ENV = "FRAMECAST_FAULT_RANK"
FAULT_POINTS = ("after_weights", "after_state", "after_meta", "before_rename", "after_rename", "during_pointer",
                "after_pointer")  # the points of a save
STEP_FAULT = "step"  # the start of a training step
_STEP = re.compile(r"step_(\d+)")
_reached: dict[str, int] = {}  # fault point -> times reached in this process
_warned: set[str] = set()  # folders already warned about


def _fault(point: str) -> None:
    """SIGKILL this process at `point` when FRAMECAST_FAULT asks for it (see the module docstring)."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    name, _, nth = spec.partition(":")
    if name != point or os.environ.get(FAULT_RANK_ENV, os.environ.get("RANK", "0")) != os.environ.get("RANK", "0"):
        return  # FRAMECAST_FAULT_RANK=r: only rank r of a torchrun job is killed
    _reached[point] = _reached.get(point, 0) + 1
    if _reached[point] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)


def _write_durable(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_text(path: str | Path, text: str, *, fault: str | None = None) -> None:
    """Replace `path` by `text` atomically and durably (tmp file, fsync, rename, fsync of the folder)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    _write_durable(tmp, text)
    if fault:
        _fault(fault)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def save(root: str | Path, step: int, *, weights: dict[str, dict[str, torch.Tensor]], meta: dict[str, Any],
         state: dict[str, Any] | None = None) -> Path:
    """Write weights (file stem -> state dict), trainer state and meta as `root/step_N`, atomically and durably."""
    root = Path(root)
    if not root.is_dir():
        root.mkdir(parents=True, exist_ok=True)
        fsync_dir(root.parent)
    final = root / f"step_{step:07d}"
    tmp = root / f".tmp_step_{step:07d}_{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    _write_tmp(tmp, step, weights, meta, state)
    _fault("before_rename")
    if final.exists():
        if incomplete(final) is None:
            same = _same(tmp, final)
            shutil.rmtree(tmp)
            if not same:
                raise CheckpointError(f"checkpoint {final} already exists; refusing to overwrite it")
            point(root, final.name)  # a re-save of the same checkpoint (a run re-done after a kill): no-op
            return final
        move_aside(final)  # an incomplete step_N: replaced by the whole one
    os.replace(tmp, final)
    fsync_dir(root)
    _fault("after_rename")
    point(root, final.name)
    _fault("after_pointer")
    return final


def _write_tmp(tmp: Path, step: int, weights: dict[str, dict[str, torch.Tensor]], meta: dict[str, Any],
               state: dict[str, Any] | None) -> None:
    """Every file of the checkpoint in `tmp`, each fsynced, meta.json (with the manifest) last, then `tmp`."""
    tmp.mkdir()
    files: dict[str, int] = {}
    for stem, sd in weights.items():
        path = tmp / f"{stem}.safetensors"
        save_file({k: v.detach().contiguous().cpu() for k, v in sd.items()}, str(path))
        files[path.name] = fsync_file(path)
    _fault("after_weights")
    if state is not None:
        torch.save(state, tmp / STATE)
        files[STATE] = fsync_file(tmp / STATE)
    _fault("after_state")
    _write_durable(tmp / META, json.dumps({**meta, "step": step, "files": files}, indent=2))
    _fault("after_meta")
    fsync_dir(tmp)


def _same(new: Path, old: Path) -> bool:
    """Whether two checkpoints hold the same weights and meta (the trainer state is derived from them)."""
    a, b = read_meta(new), read_meta(old)
    a_files, b_files = a.pop("files", {}), b.pop("files", None)
    if a != b or (b_files is not None and set(a_files) != set(b_files)):
        return False
    stems = [n for n in a_files if n.endswith(".safetensors")]
    return all((old / n).is_file() and filecmp.cmp(new / n, old / n, shallow=False) for n in stems)


def point(root: str | Path, name: str | None) -> None:
    """Make `root/latest` name `name` (None: remove it); a no-op when it already does."""
    pointer = Path(root) / POINTER
    if name is None:
        if pointer.exists():
            pointer.unlink()
            fsync_dir(pointer.parent)
        return
    try:
        if pointer.read_text().strip() == name:
            return
    except (OSError, UnicodeDecodeError):
        pass
    atomic_write_text(pointer, name, fault="during_pointer")


def move_aside(path: Path) -> Path:
    """Rename a damaged checkpoint folder to `.corrupt_<name>` (kept for inspection, never read again)."""
    for i in range(1000):
        aside = path.with_name(f".corrupt_{path.name}" + (f"_{i}" if i else ""))
        if not aside.exists():
            os.replace(path, aside)
            fsync_dir(path.parent)
            return aside
    raise CheckpointError(f"could not move {path} aside: remove the .corrupt_{path.name}* folders")


def clean(root: str | Path) -> list[Path]:
    """Remove what interrupted saves left (`.tmp_step_*` folders, `.latest.tmp`). Only for the lock holder."""
    root = Path(root)
    if not root.is_dir():
        return []
    stale = sorted(root.glob(".tmp_step_*")) + sorted(root.glob(f".{POINTER}.tmp"))
    for p in stale:
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    if stale:
        fsync_dir(root)
    return stale


def incomplete(path: str | Path) -> str | None:
    """Why `path` is not a complete checkpoint, or None when it is (the rule of the module docstring)."""
    path = Path(path)
    try:
        meta = json.loads((path / META).read_text())
    except FileNotFoundError:
        return f"{META} is missing"
    except (OSError, ValueError) as e:
        return f"{META} is unreadable ({e.__class__.__name__})"
    if not isinstance(meta, dict):
        return f"{META} is not an object"
    files = meta.get("files")
    if not isinstance(files, dict):  # written before the manifest (architecture.md §5)
        stems = [*meta.get("roles", []), *(f"ema_{n}" for n in meta.get("ema", []))]
        files = {f"{s}.safetensors": None for s in stems}
    for name, size in files.items():
        try:
            have = (path / name).stat().st_size
        except OSError:
            return f"{name} is missing"
        if size is not None and have != size:
            return f"{name} has {have} bytes, the manifest says {size}"
    return None


def scan(root: str | Path) -> Iterator[tuple[Path, str | None]]:
    """Every `step_*` folder of `root`, newest first, with why it is incomplete (None: complete)."""
    root = Path(root)
    found = []
    if root.is_dir():
        for p in root.iterdir():
            m = _STEP.fullmatch(p.name)
            if m and p.is_dir():
                found.append((int(m[1]), p))
    for _, p in sorted(found, reverse=True):
        yield p, incomplete(p)


def warn_bad(path: Path, why: str, then: str = "using the newest complete checkpoint before it") -> None:
    """Say once per process and folder that a checkpoint is skipped."""
    key = str(Path(path).resolve())
    if key not in _warned:
        _warned.add(key)
        print(f"framecast: warning: checkpoint {path} is incomplete or corrupt ({why}); {then}", file=sys.stderr,
              flush=True)


def latest(root: str | Path) -> Path | None:
    """The newest complete checkpoint under `root`, or None (the rule of the module docstring)."""
    for path, why in scan(root):
        if why is None:
            return path
        warn_bad(path, why)
    return None


def resolve(path: str | Path) -> Path:
    """A checkpoint dir, a `ckpt/` root (-> its newest complete checkpoint), a run-stage dir (-> ckpt/'s) or a
    shipped model's name, `pretrained:<name>` (framecast/pretrained, checksum-verified)."""
    if pretrained.is_name(path):
        return pretrained.resolve(path)
    p = Path(path)
    if (p / META).is_file():
        return p
    for root in (p, p / "ckpt"):
        found = latest(root)
        if found is not None:
            return found
    if (p / USED).is_file():  # a recipe stage that `use:`d an existing model: its run dir points there
        return resolve(read_used(p))
    raise CheckpointError(f"no checkpoint at {p} (expected {META}, or a ckpt/ folder with a complete step_* "
                          f"checkpoint)")


USED = "used.json"  # in the run dir of a recipe stage with `use:` (recipe.py): the model that stood in for it


def write_used(run_dir: str | Path, use: str) -> None:
    """Record in a `use:` stage's run dir which model stood in for it, so the dir loads like a trained stage's."""
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    (Path(run_dir) / USED).write_text(json.dumps({"use": use}) + "\n")


def read_used(run_dir: Path) -> str:
    path = run_dir / USED
    try:
        use = json.loads(path.read_text())["use"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise CorruptCheckpoint(f"{path} is corrupt ({e.__class__.__name__}); it should name the model that "
                                f"stood in for this stage") from None
    if not isinstance(use, str) or Path(use).resolve() == run_dir.resolve():
        raise CorruptCheckpoint(f"{path} names {use!r}, not another checkpoint")
    return use


def read_meta(ckpt: str | Path) -> dict[str, Any]:
    path = Path(ckpt) / META
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file {path} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CorruptCheckpoint(f"checkpoint file {path} is corrupt or truncated ({e.__class__.__name__})") from None


def is_dcp(ckpt: str | Path) -> bool:
    """Whether a checkpoint was written by many processes (torch.distributed.checkpoint, train/dcp.py)."""
    return read_meta(ckpt).get("format") == dcp_read.FORMAT


def load_state_dict(ckpt: str | Path, stem: str) -> dict[str, torch.Tensor]:
    """The full weights `stem` of a checkpoint, from safetensors or (a run of many processes) DCP shards."""
    if is_dcp(ckpt):
        return dcp_read.read(ckpt, stem)
    path = Path(ckpt) / f"{stem}.safetensors"
    if not path.is_file():
        have = sorted(p.stem for p in Path(ckpt).glob("*.safetensors"))
        raise CheckpointError(f"checkpoint file {path} is missing (this checkpoint has {have})")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CorruptCheckpoint(f"checkpoint file {path} is corrupt or truncated ({str(e).splitlines()[0]})") from None


def fit_weights(module: nn.Module, sd: dict[str, torch.Tensor], where: Path, *, strict: bool = True) -> None:
    """Load a state dict read from `where` into `module`, naming the file when it does not fit."""
    try:
        module.load_state_dict(sd, strict=strict)
    except RuntimeError as e:
        first = str(e).splitlines()[0]
        raise CheckpointError(f"checkpoint file {where} does not fit the model: {first} (check model.* in the "
                              f"config)") from None


def load_weights(module: nn.Module, ckpt: str | Path, stem: str, *, strict: bool = True) -> None:
    fit_weights(module, load_state_dict(ckpt, stem), Path(ckpt) / f"{stem}.safetensors", strict=strict)


def load_state(ckpt: str | Path) -> dict[str, Any]:
    path = Path(ckpt) / STATE
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file {path} is missing") from None
    except Exception as e:  # torch raises several types for a damaged zip
        raise CorruptCheckpoint(f"checkpoint file {path} is corrupt or truncated ({e.__class__.__name__})") from None
