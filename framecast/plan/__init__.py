"""The memory planner: what every stage of a recipe holds per GPU under torchrun + FSDP2 (docs/scaling.md §1-§3).

    framecast pipeline --recipe R --plan --gpus 1 8 64 --gpu-memory 80 --role dmd.real=wan2.1-14b

Every network a stage holds is built on the meta device (no memory, no weights read: `@<stage>` references and
missing checkpoints do not matter): the trained `model`, each role of its registry record (stages.py; planned
with the stage's `model:` unless `roles` names a preset or a Wan folder for it) and the copies its objective
keeps (PROFILES). Bytes are those of rank 0, the most loaded: FSDP2 gives rank r chunk r of
`torch.chunk(param, world, dim=0)`. params, grads, AdamW, EMA and frozen are exact; `gathered` (FSDP2's
unsharded units in flight) is modelled; `activations` is an estimate for one micro-batch.
"""

from __future__ import annotations

from dataclasses import dataclass

from .. import config as C
from .. import stages as S
from ..errors import ConfigError
from .memory import (BF16, FP32, GIB, HEADROOM, PROFILES, Forward, Profile, activation_estimate, gathered_bytes,
                     geometry, layout, networks, rank_numel, register_profile, role_model, shard_numel,
                     static_bytes)

__all__ = ["PROFILES", "Forward", "Profile", "StagePlanRow", "format_table", "plan", "plan_main", "plan_stage",
           "register_profile", "shard_numel", "activation_estimate", "geometry", "networks"]


@dataclass
class StagePlanRow:
    """One stage at one GPU count; bytes are per rank (rank 0, the most loaded)."""

    stage: str  # its key in the recipe (tag or stage)
    kind: str  # the stage kind
    gpus: int
    shard: int  # ranks each parameter is sharded over
    nets: list[tuple[str, str, str, int]]  # (name, trained | frozen | copy, preset, parameters)
    params: int
    grads: int
    optim: int
    ema: int
    frozen: int
    gathered: int  # modelled
    activations: int  # estimate
    step: int  # AdamW's foreach temporary (one fp32 copy of a role's shard) while activations are freed
    tokens: int  # of one training video
    gpu_memory_gib: float | None = None

    @property
    def static(self) -> int:
        return self.params + self.grads + self.optim + self.ema + self.frozen

    @property
    def total(self) -> int:
        return self.static + max(self.gathered + self.activations, self.step)

    @property
    def fits(self) -> bool | None:
        return None if self.gpu_memory_gib is None else self.total <= (1 - HEADROOM) * self.gpu_memory_gib * GIB


def shard_world(cfg: C.RunConfig, gpus: int) -> int:
    if gpus < 1:
        raise ConfigError(f"--gpus must be >= 1, got {gpus}")
    g = cfg.dist.shard_group
    if g and (g > gpus or gpus % g):
        raise ConfigError(f"dist.shard_group={g} must divide the number of GPUs ({gpus}); use dist.shard_group=0 "
                          f"to shard over all of them")
    return g or gpus


def plan_stage(cfg: C.RunConfig, *, gpus: int, gpu_memory_gib: float | None = None,
               roles: dict[str, str] | None = None) -> StagePlanRow:
    """Stage `cfg` at `gpus` ranks; `roles["model"]` plans its model (and so every role left unnamed) as that."""
    roles = dict(roles or {})
    if roles.get("model"):
        cfg = C.from_dict({"model": C.to_dict(role_model(cfg, "model", roles))}, base=cfg)
    world, nets = shard_world(cfg, gpus), networks(cfg, roles)
    mixed = cfg.dist.mixed_precision == "bf16"
    a = BF16 if mixed or cfg.train.amp == "bf16" else FP32
    st = static_bytes(nets, world, mixed)
    step = max(rank_numel(layout(n.model).params, world) * FP32 for n in nets if n.kind == "trained")
    frames, per_frame = geometry(cfg)
    return StagePlanRow(cfg.tag or cfg.stage, cfg.stage, gpus, world,
                        [(n.name, n.kind, n.model.preset, layout(n.model).count) for n in nets], **st,
                        gathered=gathered_bytes(nets, BF16 if mixed else FP32, cfg.dist.reshard_after_forward),
                        activations=activation_estimate(cfg, nets, a).total, step=step, tokens=frames * per_frame,
                        gpu_memory_gib=gpu_memory_gib)


def plan(cfgs: list[C.RunConfig] | C.Recipe, *, gpus: int, gpu_memory_gib: float | None = None,
         roles: dict[str, str] | None = None) -> list[StagePlanRow]:
    """One row per stage of a recipe (or list of run configs) at `gpus` ranks; `roles` maps a role key (dmd.real,
    dmd.critic, cd.teacher, ode.teacher, or model: the trained one) to the preset or Wan folder it is planned as."""
    stages = [c for c in (cfgs.stages if isinstance(cfgs, C.Recipe) else cfgs) if not c.use]  # `use:` trains nothing
    keys = {"model"} | {r.key for c in stages for r in S.get(c.stage).roles}
    unknown = sorted(set(roles or {}) - keys)
    if unknown:
        raise ConfigError(f"--role {unknown[0]}: no stage of this recipe has that role (its roles: "
                          f"{', '.join(sorted(keys)) or 'none'})")
    return [plan_stage(c, gpus=gpus, gpu_memory_gib=gpu_memory_gib, roles=roles) for c in stages]


def _gib(n: int) -> str:
    return f"{n / GIB:.2f}"


def format_table(rows: list[StagePlanRow]) -> str:
    """A markdown table (GiB per GPU, rank 0) and one line per stage naming its networks."""
    mem = next((r.gpu_memory_gib for r in rows if r.gpu_memory_gib is not None), None)
    head = ["stage", "GPUs", "shard", "params", "grads", "AdamW", "EMA", "frozen", "gathered", "activations~",
            "total", f"fits {mem:g} GiB" if mem is not None else "fits"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        fit = "-" if r.fits is None else "yes" if r.fits else "NO"
        vals = [r.stage, str(r.gpus), str(r.shard), *map(_gib, (r.params, r.grads, r.optim, r.ema, r.frozen,
                                                                r.gathered, r.activations, r.total)), fit]
        out.append("| " + " | ".join(vals) + " |")
    seen: dict[str, str] = {}
    for r in rows:
        seen.setdefault(r.stage, ", ".join(f"{n} {preset} {kind} {count / 1e9:.3g}B" if count >= 1e8 else
                                           f"{n} {preset} {kind} {count:,}" for n, kind, preset, count in r.nets)
                        + f"; {r.tokens:,} tokens per video")
    out += ["", *(f"- {k}: {v}" for k, v in seen.items()), "",
            f"GiB per GPU on rank 0 (the most loaded). params, grads, AdamW, EMA and frozen are exact; gathered is "
            f"FSDP2's in-flight unsharded units (modelled); activations~ is an estimate for one micro-batch. total = "
            f"resident + max(gathered + activations, AdamW step temporary); fits leaves {HEADROOM:.0%} headroom."]
    return "\n".join(out)


def plan_main(recipe: str, overrides: list[str], gpus: list[int], gpu_memory_gib: float | None,
              roles: list[str]) -> str:
    """`framecast pipeline --recipe R --plan [--gpus ...] [--gpu-memory G] [--role key=preset ...]`."""
    bad = [r for r in roles if "=" not in r or not r.split("=", 1)[1]]
    if bad:
        raise ConfigError(f"--role {bad[0]}: expected <role key>=<model preset or Wan folder>, e.g. "
                          f"dmd.real=wan2.1-14b")
    if not gpus:
        raise ConfigError("--gpus needs at least one GPU count, e.g. --gpus 1 8 64")
    if gpu_memory_gib is not None and not gpu_memory_gib > 0:
        raise ConfigError(f"--gpu-memory must be > 0 GiB, got {gpu_memory_gib}")
    # planning runs nothing: the recipe's device need not exist here
    rec = C.load_recipe(recipe, [o for o in overrides if not o.startswith("train.device=")])
    mapping = dict(r.split("=", 1) for r in roles)
    rows = [row for g in gpus for row in plan(rec, gpus=g, gpu_memory_gib=gpu_memory_gib, roles=mapping)]
    order = [c.tag or c.stage for c in rec.stages]
    rows.sort(key=lambda r: (order.index(r.stage), r.gpus))
    return f"recipe {rec.name} ({recipe})\n\n" + format_table(rows)
