"""Atomic, self-describing checkpoints (architecture.md §5).

    <run>/ckpt/step_0000100/
        meta.json               stage, step, resolved config, sampling info (block size, schedule, ...)
        <role>.safetensors      weights of each trainable network (unwrapped: no FSDP/DDP key surgery)
        ema_<role>.safetensors  EMA weights, when kept
        trainer_state.pt        optimisers, step (RNG needs no saving: every step reseeds from (seed, step))
    <run>/ckpt/latest           name of the newest complete checkpoint

A checkpoint directory is written under a temporary name and renamed only when complete, and `latest`
is replaced atomically, so an interrupted save never leaves a half checkpoint that looks whole and never
replaces a good one. Existing checkpoints are never overwritten.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import CheckpointError

META = "meta.json"
STATE = "trainer_state.pt"




def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save(root: str | Path, step: int, *, weights: dict[str, dict[str, torch.Tensor]], meta: dict[str, Any],
         state: dict[str, Any] | None = None) -> Path:
    """Write weights (file stem -> state dict), meta and trainer state as `root/step_N`, atomically."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:07d}"
    if final.exists():
        raise CheckpointError(f"checkpoint {final} already exists; refusing to overwrite it")
    tmp = root / f".tmp_step_{step:07d}_{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    for stem, sd in weights.items():
        save_file({k: v.detach().contiguous().cpu() for k, v in sd.items()}, str(tmp / f"{stem}.safetensors"))
    (tmp / META).write_text(json.dumps({**meta, "step": step}, indent=2))
    if state is not None:
        torch.save(state, tmp / STATE)
    os.replace(tmp, final)
    _atomic_write_text(root / "latest", final.name)
    return final


def latest(root: str | Path) -> Path | None:
    """The newest complete checkpoint under `root`, or None."""
    root = Path(root)
    pointer = root / "latest"
    if not pointer.is_file():
        return None
    path = root / pointer.read_text().strip()
    if not (path / META).is_file():
        raise CheckpointError(f"{pointer} points to {path}, which is not a complete checkpoint")
    return path


def resolve(path: str | Path) -> Path:
    """A checkpoint dir, a `ckpt/` root (-> latest) or a run-stage dir (-> ckpt/latest)."""
    p = Path(path)
    if (p / META).is_file():
        return p
    for root in (p, p / "ckpt"):
        if (root / "latest").is_file():
            found = latest(root)
            if found is not None:
                return found
    raise CheckpointError(f"no checkpoint at {p} (expected {META}, or a ckpt/latest pointer)")


def read_meta(ckpt: str | Path) -> dict[str, Any]:
    path = Path(ckpt) / META
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file {path} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"checkpoint file {path} is corrupt or truncated ({e.__class__.__name__})") from None


def load_state_dict(ckpt: str | Path, stem: str) -> dict[str, torch.Tensor]:
    path = Path(ckpt) / f"{stem}.safetensors"
    if not path.is_file():
        have = sorted(p.stem for p in Path(ckpt).glob("*.safetensors"))
        raise CheckpointError(f"checkpoint file {path} is missing (this checkpoint has {have})")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint file {path} is corrupt or truncated ({str(e).splitlines()[0]})") from None


def load_weights(module: nn.Module, ckpt: str | Path, stem: str, *, strict: bool = True) -> None:
    sd = load_state_dict(ckpt, stem)
    try:
        module.load_state_dict(sd, strict=strict)
    except RuntimeError as e:
        first = str(e).splitlines()[0]
        raise CheckpointError(f"checkpoint file {Path(ckpt) / (stem + '.safetensors')} does not fit the model: "
                              f"{first} (check model.* in the config)") from None


def load_state(ckpt: str | Path) -> dict[str, Any]:
    path = Path(ckpt) / STATE
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file {path} is missing") from None
    except Exception as e:  # torch raises several types for a damaged zip
        raise CheckpointError(f"checkpoint file {path} is corrupt or truncated ({e.__class__.__name__})") from None
