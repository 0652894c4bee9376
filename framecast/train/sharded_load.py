"""Pretrained weights into sharded networks without ever holding a whole network on one rank (docs/scaling.md).

Under torchrun a stage builds every network that loads weights (the trained model from `init=`, its roles: the
teacher, real score, critic) on the meta device; `train/distributed.py` shards them; `materialise` then gives
each rank storage for its own shards only and fills them: from a framecast safetensors checkpoint or a Wan
folder / official file each rank reads only the rows of its shards (models/weights.py), from a DCP checkpoint
DCP itself reads the matching pieces. An extra network with no checkpoint of its own (CD's target network, a
copy of the student) starts from the trained model's loaded shards.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError
from ..models.weights import Lazy, open_safetensors
from . import checkpoint as ckpt
from . import dcp
from .distributed import Dist, networks, shard_plan


ZERO_INIT_ADDITIONS = ("action_embed.", "net.spatial_embed.")


def _is_meta(module: nn.Module) -> bool:
    return any(p.is_meta for p in module.parameters())


def _rows(t: torch.Tensor) -> tuple[int, int] | None:
    """(first, last + 1) rows of dim 0 this rank holds of a DTensor sharded on dim 0; None: a whole tensor."""
    if not hasattr(t, "device_mesh"):
        return None
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    return (offset[0], offset[0] + shape[0]) if len(shape) else None


def copy_shards(module: nn.Module, tensors: dict[str, Lazy], where: str) -> None:
    """Fill `module`'s (sharded) state from lazily read tensors, every key and shape checked first."""
    own = module.state_dict()
    # zero-initialised additions a file may lack (a world model started from a text-to-video file: its action
    # embedder; model.spatial_embed started from a network without it) keep their own zero init, so the network
    # starts as the file's network
    keep = {k for k in set(own) - set(tensors) if k.startswith(ZERO_INIT_ADDITIONS) and not own[k].is_meta}
    fill({k: v for k, v in own.items() if k not in keep}, tensors, where)


def fill(own: dict[str, torch.Tensor], tensors: dict[str, Lazy], where: str) -> None:
    """Copy into each tensor of `own` (a DTensor: only this rank's rows) the same key of `tensors`."""
    missing, unexpected = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
    shape = [k for k in own if k in tensors and tuple(tensors[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shape:
        raise CheckpointError(f"{where} does not fit the network: {len(missing)} missing ({missing[:3]}), "
                              f"{len(unexpected)} unexpected ({unexpected[:3]}), {len(shape)} of another shape "
                              f"({shape[:3]})")
    with torch.no_grad():
        for k, t in own.items():
            span = _rows(t)
            local = t.to_local() if hasattr(t, "to_local") else t
            src = tensors[k].full() if span is None else tensors[k].rows(*span)
            local.copy_(src.to(local.dtype))


def shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`full` laid out as `like` is: this rank's rows as a DTensor of like's mesh and placements, or as is."""
    span = _rows(like)
    if span is None:
        return full.to(like.device)
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(full[span[0]:span[1]].to(like.device), like.device_mesh, like.placements,
                              run_check=False, shape=like.shape, stride=like.stride())


def load_into(module: nn.Module, path: str | Path, dist: Dist) -> str:
    """Load the model weights at `path` (its EMA when kept) into `module`; returns what was read."""
    try:
        src = ckpt.resolve(path)
    except CheckpointError:
        if ckpt.pretrained.is_name(path):  # a shipped model's own error (unknown name, checksum), not a Wan path
            raise
        src = None
    if src is None:  # a Wan folder or release (models/wan.py reads it lazily, with its key tables)
        from ..models import wan

        _, sd, info = wan.transformer_weights(path)
        copy_shards(module, {f"net.{k}": v for k, v in sd.items()}, f"{info['format']} checkpoint {path}")
        return f"{path} ({info['format']})"
    meta = ckpt.read_meta(src)
    if not isinstance(meta, dict) or not isinstance(meta.get("ema", []), list):
        raise CheckpointError(f"checkpoint file {src / ckpt.META} must hold a JSON object whose `ema` lists weight "
                              f"names")
    stem = "ema_model" if "model" in meta.get("ema", []) else "model"
    if ckpt.is_dcp(src):
        sd = module.state_dict()
        dcp.load(src, {stem: sd}, dist)
        module.load_state_dict(sd)
    else:
        copy_shards(module, open_safetensors(src / f"{stem}.safetensors"), f"checkpoint {src}")
    return f"{src} ({stem})"


def materialise(networks: list[nn.Module], sources: dict[int, str], model: nn.Module, dist: Dist) -> None:
    """Storage for this rank's shards of every meta network, filled from `sources` (id(network) -> path); a
    meta network without a source must have the model's layout and starts as a copy of its shards."""
    from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

    order = sorted({id(n): n for n in networks}.values(), key=lambda n: id(n) not in sources)  # sourced first
    for net in order:
        if not _is_meta(net):
            continue
        net.to_empty(device=dist.device)
        cfg = net.net.config  # RoPE tables are buffers outside state dicts: compute them again
        with torch.device(dist.device):
            net.net.rope = WanRotaryPosEmbed(cfg.attention_head_dim, cfg.patch_size, cfg.rope_max_seq_len)
        if id(net) in sources:
            load_into(net, sources[id(net)], dist)
            continue
        a, b = net.state_dict(), model.state_dict()
        if set(a) != set(b) or any(a[k].shape != b[k].shape for k in a):
            raise CheckpointError("a network of this stage has no checkpoint to load and is not a copy of the "
                                  "trained model")
        with torch.no_grad():
            for k in a:
                (a[k].to_local() if hasattr(a[k], "to_local") else a[k]).copy_(
                    b[k].to_local() if hasattr(b[k], "to_local") else b[k])


def shard_and_load(objective, dist: Dist, sources: dict[int, str], model: nn.Module, **kw) -> None:
    """Under torchrun: shard every network of the objective (train/distributed.py), then `materialise` those
    built on the meta device; a no-op in one process."""
    if dist.active:
        shard_plan(objective, dist, **kw)
        materialise(networks(objective), sources, model, dist)
