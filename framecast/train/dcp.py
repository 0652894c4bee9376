"""Checkpoints of runs launched by torchrun: `torch.distributed.checkpoint` (DCP) inside framecast's protocol.

    <run>/ckpt/step_0000100/
        dcp/.metadata, dcp/__<r>_0.distcp   every rank's shards of every role, EMA, extra network and optimiser
        meta.json                            written last by rank 0: format "dcp", world size, trainer state
                                             (step, EMA status, log window) and the manifest of every DCP file

The save follows train/checkpoint.py: all ranks write into `.tmp_step_N_dist/` and fsync their own files; after
a barrier rank 0 writes meta.json with the manifest, renames the folder to `step_N` and moves `latest`; a
checkpoint is visible only when complete, and the scanning rule (`checkpoint.incomplete`) is the same. Only
tensors go into DCP (trainer state is JSON in meta.json), and DCP's index is read with a restricted
unpickler (train/dcp_read.py). Loading reshards: a checkpoint of W ranks resumes at any world size, or in
one process; `framecast convert` (generate.convert) writes its weights as one safetensors framecast checkpoint,
and every loader reads it directly (checkpoint.load_state_dict).
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch

from . import checkpoint as ckpt
from .dcp_read import DIR, FORMAT, CorruptCheckpoint, SafeReader, folder
from .distributed import Dist, finite


def _tmp(root: Path, step: int) -> Path:
    return root / f".tmp_step_{step:07d}_dist"  # one name for all ranks (`clean` removes it after a kill)


def save(root: str | Path, step: int, *, tensors: dict[str, dict[str, torch.Tensor]], meta: dict[str, Any],
         dist: Dist) -> Path:
    """Write every rank's shards of `tensors` (stem -> state dict) and rank 0's meta.json as `root/step_N`."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemWriter

    root = Path(root)
    final, tmp = root / f"step_{step:07d}", _tmp(root, step)
    if dist.main:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        (tmp / DIR).mkdir(parents=True)
    dist.barrier()
    dcp.save(tensors, storage_writer=FileSystemWriter(tmp / DIR, sync_files=True), no_dist=not dist.active)
    ckpt._fault("after_weights")
    dist.barrier()  # every rank's shards are written and fsynced (sync_files)
    if dist.main:
        files = {f"{DIR}/{p.name}": ckpt.fsync_file(p) for p in sorted((tmp / DIR).iterdir())}
        ckpt.fsync_dir(tmp / DIR)
        ckpt._write_durable(tmp / ckpt.META, json.dumps(
            {**meta, "format": FORMAT, "world_size": dist.world, "step": step, "files": files}, indent=2))
        ckpt._fault("after_meta")
        ckpt.fsync_dir(tmp)
        _publish(root, final, tmp)
    dist.barrier()
    return final


def _publish(root: Path, final: Path, tmp: Path) -> None:
    ckpt._fault("before_rename")
    if final.exists():
        if ckpt.incomplete(final) is None:
            a, b = ckpt.read_meta(tmp), ckpt.read_meta(final)
            a.pop("files"), b.pop("files", None)
            shutil.rmtree(tmp)
            if a != b:
                raise ckpt.CheckpointError(f"checkpoint {final} already exists; refusing to overwrite it")
            ckpt.point(root, final.name)
            return
        ckpt.move_aside(final)
    os.replace(tmp, final)
    ckpt.fsync_dir(root)
    ckpt._fault("after_rename")
    ckpt.point(root, final.name)
    ckpt._fault("after_pointer")


def load(path: str | Path, tensors: dict[str, dict[str, torch.Tensor]], dist: Dist) -> None:
    """Fill `tensors` (stem -> state dict of this process's shards or full tensors) in place from `path`.

    Every key asked for must be in the checkpoint; a missing one or a damaged file is one error naming it."""
    import torch.distributed.checkpoint as dcp

    try:
        with warnings.catch_warnings():  # one process loading a checkpoint of many: the single-process notice
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(tensors, storage_reader=SafeReader(folder(path)), no_dist=not dist.active)
    except ckpt.CheckpointError:
        raise
    except Exception as e:  # DCP wraps every rank's failure in a CheckpointException
        first = str(e).strip().splitlines()
        raise CorruptCheckpoint(f"checkpoint {folder(path)} could not be read "
                                f"({(first[-1] if first else type(e).__name__)[:300]})") from None


def check_finite(tensors: dict[str, dict[str, torch.Tensor]], dist: Dist) -> str | None:
    """The first stem holding a non-finite value on any rank, or None."""
    for stem, sd in tensors.items():
        if not finite(sd.values(), dist):
            return stem
    return None


# ------------------------------------------------------------------------------------------------
# Optimiser state as plain tensors (no pickled Python objects in DCP): `<param name>.<state key>`
# ------------------------------------------------------------------------------------------------


def optimizer_tensors(module: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """AdamW's per-parameter state keyed by parameter name; hyperparameters come from the config."""
    out = {}
    for name, p in module.named_parameters():
        for k, v in opt.state.get(p, {}).items():
            if isinstance(v, torch.Tensor):
                out[f"{name}.{k}"] = v
    return out


def optimizer_template(module: torch.nn.Module, stored: set[str]) -> dict[str, torch.Tensor]:
    """Tensors shaped like the state `stored` (keys `<param>.<state>`) for this process's parameters."""
    out = {}
    for name, p in module.named_parameters():
        if f"{name}.exp_avg" in stored:
            out[f"{name}.step"] = torch.zeros((), dtype=torch.float32)
            out[f"{name}.exp_avg"] = torch.zeros_like(p)
            out[f"{name}.exp_avg_sq"] = torch.zeros_like(p)
    return out


def restore_optimizer(module: torch.nn.Module, opt: torch.optim.Optimizer, flat: dict[str, torch.Tensor]) -> None:
    for name, p in module.named_parameters():
        if f"{name}.exp_avg" in flat:
            opt.state[p] = {k: flat[f"{name}.{k}"] for k in ("step", "exp_avg", "exp_avg_sq")}
