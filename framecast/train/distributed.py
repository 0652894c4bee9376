"""Many processes: torchrun + FSDP2 over an explicit device mesh (docs/scaling.md).

One process by default. Under torchrun (WORLD_SIZE > 1) `init` joins the process group (gloo on the CPU, NCCL
on CUDA) and builds an explicit mesh: on a CUDA host a gloo group with the default mesh would follow the
accelerator, so the mesh always names the device type. `shard` applies `fully_shard` per transformer block,
then to the transformer root and the action embedder, to every network a stage holds: the trained roles,
the objective's extra state (CD's target network) and its frozen networks (teacher, real score), the last
without gradients or optimiser state. `dist.shard_group=N` is hybrid sharding: shard within groups of N ranks
(a node), replicate across groups.

What stays identical to one process (tests/test_distributed.py): every per-sample draw comes from that
sample's own generator (rng.py), the gradient is FSDP's mean over ranks of each rank's mean over its
micro-batches, and the logged values are the same mean, so W ranks x batch B equal one process with
grad_accum W at batch B, and grad_accum 2 at batch B equals batch 2B, up to float summation order.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
import torch.distributed as tdist
from torch import nn

from ..errors import ConfigError


@dataclass
class Dist:
    """Where this process stands: rank, world size, device and mesh (None in one process)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    mesh: Any = None  # torch.distributed.device_mesh.DeviceMesh under torchrun
    launched: bool = False  # started by torchrun (even with one process): checkpoints are DCP

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        """Launched by torchrun, even as one process: every network goes through FSDP2 (its mixed precision
        included), so 1 GPU and 64 run the same code."""
        return self.launched

    def barrier(self) -> None:
        if tdist.is_initialized():
            tdist.barrier()

    def mean(self, values: dict[str, float]) -> dict[str, float]:
        """The mean over ranks of each value (every rank holds the same keys: the step is deterministic)."""
        if not self.active or not values:
            return values
        keys = sorted(values)
        t = torch.tensor([values[k] for k in keys], dtype=torch.float64)
        tdist.all_reduce(t)  # gloo and NCCL both sum float64
        return {k: float(v) / self.world for k, v in zip(keys, t.tolist())}

    def all_true(self, flag: bool) -> bool:
        if not self.active:
            return flag
        t = torch.tensor([0 if flag else 1], dtype=torch.int64)
        tdist.all_reduce(t)
        return int(t) == 0

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank (small Python objects: paths, decisions)."""
        if not self.active:
            return obj
        box = [obj]
        tdist.broadcast_object_list(box, src=0)
        return box[0]

    def sample_range(self, micro: int, accum: int, batch: int) -> range:
        """Global indices of micro-batch `micro` of this rank in a step of batch x accum x world samples."""
        start = (self.rank * accum + micro) * batch
        return range(start, start + batch)


SINGLE = Dist()


def launched() -> bool:
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def world_size() -> int:
    """The number of processes of this job (torchrun's WORLD_SIZE; 1 without torchrun)."""
    return int(os.environ["WORLD_SIZE"]) if launched() else 1


_CURRENT: list[Dist] = []  # the job's Dist once `init` has built it (a process joins one job)


def init(device: str = "cpu", *, shard_group: int = 0) -> Dist:
    """Join torchrun's process group and build the mesh, once per process (later calls return the same `Dist`);
    `SINGLE` when not launched by torchrun."""
    if not launched():
        return SINGLE
    if _CURRENT:
        return _CURRENT[0]
    from torch.distributed.device_mesh import init_device_mesh

    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    dev = torch.device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    if not tdist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        tdist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
    if shard_group and (world % shard_group or shard_group > world):
        raise ConfigError(f"dist.shard_group={shard_group} must divide the world size {world}")
    if shard_group and shard_group < world:  # HSDP: replicate across groups, shard within one
        mesh = init_device_mesh(dev.type, (world // shard_group, shard_group), mesh_dim_names=("replicate", "shard"))
    else:
        mesh = init_device_mesh(dev.type, (world,), mesh_dim_names=("shard",))
    _CURRENT.append(Dist(rank, world, local, dev, mesh, launched=True))
    return _CURRENT[0]


def close() -> None:
    _CURRENT.clear()
    if tdist.is_initialized():
        tdist.destroy_process_group()


# ------------------------------------------------------------------------------------------------
# Sharding
# ------------------------------------------------------------------------------------------------


def _units(module: nn.Module) -> list[nn.Module]:
    """The FSDP units of a denoiser, innermost first: each block, then the backbone root, then the action
    embedder. Blocks are called as modules (models/transformer.py), so FSDP's hooks gather them one at a time."""
    net = getattr(module, "net", module)
    units = list(getattr(net, "blocks", []))
    units.append(net)
    embed = getattr(module, "action_embed", None)
    if embed is not None:
        units.append(embed)
    return units


def policy(mixed_precision: str):
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if mixed_precision == "bf16":  # bf16 compute, fp32 gradient reduction; the sharded fp32 weights are the master
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if mixed_precision != "none":
        raise ConfigError(f"unknown dist.mixed_precision {mixed_precision!r}; choose none or bf16")
    return MixedPrecisionPolicy()


def shard(module: nn.Module, dist: Dist, *, mixed_precision: str = "none", reshard_after_forward: bool = True) -> nn.Module:
    """`fully_shard` a denoiser in place, per block then at the root (a no-op in one process)."""
    if not dist.active:
        return module
    from torch.distributed.fsdp import FSDPModule, fully_shard

    if any(isinstance(m, FSDPModule) for m in _units(module)):
        return module  # shared between roles (e.g. a critic that is also the real score): shard it once
    mp = policy(mixed_precision)
    for unit in _units(module):
        fully_shard(unit, mesh=dist.mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    return module


def shard_all(modules: Iterable[nn.Module], dist: Dist, **kw) -> None:
    for m in modules:
        shard(m, dist, **kw)


def networks(objective) -> list[nn.Module]:
    """Every network an objective holds: its roles, its extra state and its frozen networks."""
    return [*objective.roles.values(), *objective.state_modules().values(), *objective.frozen_modules().values()]


def shard_plan(objective, dist: Dist, **kw) -> None:
    """Shard every network of the objective. Under bf16 mixed precision the frozen ones (teacher, real score)
    are stored in bf16: they have no master weights to keep, so their shards take half the memory."""
    if not dist.active:
        return
    if kw.get("mixed_precision") == "bf16":
        for m in objective.frozen_modules().values():
            m.to(torch.bfloat16)
    shard_all(networks(objective), dist, **kw)


def gradient_sync(modules: Iterable[nn.Module], enabled: bool) -> None:
    """Reduce-scatter gradients only on the last micro-batch of a step (FSDP keeps them unsharded till then)."""
    for m in modules:
        for unit in _units(m):
            if hasattr(unit, "set_requires_gradient_sync"):
                unit.set_requires_gradient_sync(enabled, recurse=False)


def full_value(t: torch.Tensor) -> torch.Tensor:
    """A DTensor gathered to a plain tensor (every rank must call it); a plain tensor as is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor; a plain tensor as is."""
    return t.to_local() if hasattr(t, "to_local") else t


def finite(tensors: Iterable[torch.Tensor], dist: Dist) -> bool:
    """Whether every floating tensor is finite on every rank (each checks its own shards)."""
    ok = all(bool(torch.isfinite(local(v)).all()) for v in tensors if v.is_floating_point())
    return dist.all_true(ok)

