"""The stage registry: one record per training method, in the spirit of DiT's `DiT_models` table.

    stage0  bidirectional base, flow matching                          (the real score / critic init)
    stage1  AR model from stage0, teacher forcing (or the DF baseline) (the ODE / CD teacher), method.md §4
    ode     few-step init: regression on ODE pairs of the AR teacher   (or the bidirectional baseline), §5
    cd      few-step init: causal consistency distillation from the AR teacher, §6
    dmd     asymmetric DMD with self-rollout: generator from ode/cd, critic + real score from stage0, §7

A record says what the method is (the generator modes it trains, whether it makes a few-step generator),
which other checkpoints it needs (`Role`: the config key, the kind of model it must be, and which earlier
stage of a recipe fills it by default), its config section, how to build its objective and data
(`build`), and the loss rule its health check applies. Nothing above this module compares stage names.

Adding a method = one objective file + one `register(Stage(...))` record (+ a recipe and tests); the test
suite registers one from a test file alone (tests/test_stage_registry.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from . import config as C
from . import flow
from .data.sources import build_source
from .errors import ConfigError
from .eval.health import LossRule
from .generate import build_denoiser, codec_for, describe, load
from .models.conditioning import build_text_encoder
from .models.denoiser import Denoiser
from .objectives import Objective
from .spec import SamplingSpec, few_step_fields
from .train import checkpoint as ckpt
from .train import distributed
from .train.loop import OptimSpec

CAUSAL_MODES = ("teacher_forcing", "diffusion_forcing")


@dataclass(frozen=True)
class Role:
    """A frozen (or separately trained) network a stage loads from another checkpoint."""

    key: str  # dotted config key of its checkpoint path, e.g. "cd.teacher"
    kind: Callable[[C.RunConfig], str]  # "causal" | "bidirectional": what that checkpoint must be
    default: Callable[[C.RunConfig], str]  # the stage kind whose last run in a recipe fills it


@dataclass
class StagePlan:
    """What a stage trains: its objective, its data and any optimiser that differs from `train.*`."""

    objective: Objective
    source: Any
    optim: dict[str, OptimSpec] = field(default_factory=dict)


Builder = Callable[[C.RunConfig, Denoiser, Any, dict[str, Denoiser]], StagePlan]


@dataclass(frozen=True)
class Stage:
    name: str
    modes: tuple[str, ...]  # generator modes it trains (objective.mode); the first is the default
    few_step: bool  # makes a few-step generator (sampled with the `few_step:` schedule, without CFG)
    build: Builder  # (config, the trained network, the data source, the loaded roles) -> StagePlan
    loss_rule: LossRule = LossRule()
    section: str | None = None  # its own config section (compared when a recipe reuses a finished run)
    roles: tuple[Role, ...] = ()
    needs_init: bool = False  # distils an existing model: `init=` is required
    help: str = ""


STAGES: dict[str, Stage] = {}


def register(stage: Stage) -> Stage:
    if not stage.modes or any(m not in ("bidirectional", *CAUSAL_MODES) for m in stage.modes):
        raise ValueError(f"stage {stage.name!r}: modes must be among bidirectional, {CAUSAL_MODES}")
    STAGES[stage.name] = stage
    return stage


def get(name: str) -> Stage:
    if name not in STAGES:
        raise ConfigError(f"unknown stage {name!r}; choose one of {sorted(STAGES)}")
    return STAGES[name]


# ------------------------------------------------------------------------------------------------
# What every stage shares: its mode, schedule, sampling spec, data and roles
# ------------------------------------------------------------------------------------------------


def mode_of(cfg: C.RunConfig) -> str:
    """The generator's mode: objective.mode where the stage offers a choice, else the stage's own."""
    st = get(cfg.stage)
    mode = cfg.objective.mode or st.modes[0]
    if mode not in st.modes:
        raise ConfigError(f"stage {cfg.stage!r} trains the {' / '.join(st.modes)} mode; objective.mode={mode!r} "
                          f"does not apply to it (leave objective.mode unset)")
    return mode


def normalise(cfg: C.RunConfig, *, stored: bool = False) -> C.RunConfig:
    """`cfg` with objective.mode filled in (what a run records). `stored`: a config an older framecast saved,
    whose objective.mode may name a mode its stage ignored; that value is replaced, not refused."""
    st = get(cfg.stage)
    if stored and cfg.objective.mode not in st.modes:
        cfg = C.from_dict({"objective": {"mode": ""}}, base=cfg)
    return C.from_dict({"objective": {"mode": mode_of(cfg)}}, base=cfg)


def few_step_schedule(cfg: C.RunConfig) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(sigmas, first-block sigmas or None) from the warped step lists (method.md §2, §7.6)."""
    fs, T = cfg.few_step, cfg.flow.num_train_timesteps
    sig = flow.few_step_sigmas(fs.denoising_steps, cfg.flow.shift, num_train_timesteps=T)
    first = flow.few_step_sigmas(fs.first_block_steps, cfg.flow.shift, num_train_timesteps=T) \
        if fs.first_block_steps else None
    return sig, first


def ode_anchors(cfg: C.RunConfig) -> torch.Tensor:
    """The anchors of ODE pairs / CD grids: every sigma either schedule visits, largest first."""
    sig, first = few_step_schedule(cfg)
    both = sig if first is None else torch.cat([sig, first])
    return torch.unique(both).flip(0)


def sampling_spec(cfg: C.RunConfig) -> SamplingSpec:
    """How a checkpoint of this run samples (saved in it as JSON)."""
    st, mode = get(cfg.stage), mode_of(cfg)
    causal = mode != "bidirectional"
    codec = codec_for(cfg)
    pixel = (codec.pixel_channels, cfg.data.height, cfg.data.width)
    kw: dict[str, Any] = {"sampler": "euler", "steps": cfg.sample.steps}
    if st.few_step:
        kw = few_step_fields(cfg.few_step.denoising_steps, cfg.few_step.first_block_steps, cfg.flow.shift,
                             cfg.flow.num_train_timesteps)
    return SamplingSpec(
        mode=mode, block_size=cfg.objective.block_size if causal else None,
        num_frames=codec.latent_frames(cfg.data.num_frames), latent_shape=codec.latent_shape(pixel),
        pixel_shape=pixel, codec=codec.name, shift=cfg.flow.shift,
        guidance=1.0 if st.few_step else cfg.sample.guidance,  # distilled generators sample without CFG
        window=cfg.objective.window if causal else 0, sink=cfg.objective.sink if causal else 0,
        text_encoder=cfg.data.text_encoder, text_tokens=cfg.data.text_tokens, **kw)


def build_data(cfg: C.RunConfig):
    """The training source of a run: its data through the text encoder and the codec the model expects."""
    text = build_text_encoder(cfg.data.text_encoder, cfg.model.text_dim, cfg.data.text_tokens, cfg.data.seed,
                              source=cfg.data.text_encoder_source or None)
    return build_source(cfg.data, text, codec_for(cfg), cfg.model.num_actions)


def role_path(cfg: C.RunConfig, role: Role) -> str:
    section, name = role.key.split(".")
    return getattr(getattr(cfg, section), name)


def load_role(cfg: C.RunConfig, role: Role, *, meta: bool = False, device: str | None = None) -> Denoiser:
    """The network of `role`, checked to be the kind of model and the shapes the stage needs. `meta`: built on
    the meta device from the checkpoint's metadata, for each rank to load its shards (train/sharded_load.py)."""
    path, want = role_path(cfg, role), role.kind(cfg)
    if not path:
        raise ConfigError(f"stage {cfg.stage!r} needs {role.key} (a checkpoint path; in a recipe `@<stage>`)")
    if meta:
        (tm, mode), m = describe(path), None
    else:
        m = load(path, device=str(device or cfg.train.device))
        tm, mode = m.config.model, m.spec.mode
    ok = mode == "bidirectional" if want == "bidirectional" else mode in CAUSAL_MODES
    if not ok:
        raise ConfigError(f"{role.key}={path!r} is a {mode!r} model; stage {cfg.stage!r} needs a {want} one")
    if tm.in_channels != cfg.model.in_channels or tm.text_dim != cfg.model.text_dim:
        raise ConfigError(f"{role.key}={path!r} has in_channels/text_dim {tm.in_channels}/{tm.text_dim}, the "
                          f"student {cfg.model.in_channels}/{cfg.model.text_dim}")
    net = build_denoiser(tm, "meta") if m is None else m.denoiser
    # how the network runs follows this run's config, not the one it was saved with (the planner assumes so)
    net.net.gradient_checkpointing = cfg.model.gradient_checkpointing
    net.net.attention_backend = cfg.model.attention_backend
    return net


def load_roles(cfg: C.RunConfig, *, meta: bool = False) -> dict[str, Denoiser]:
    return {r.key.split(".")[1]: load_role(cfg, r, meta=meta) for r in get(cfg.stage).roles}


# ------------------------------------------------------------------------------------------------
# The records
# ------------------------------------------------------------------------------------------------


def _flow_matching(cfg: C.RunConfig, model: Denoiser, source, roles) -> StagePlan:
    from .objectives.diffusion import FlowMatching

    obj = C.ObjectiveConfig(**{**C.to_dict(cfg.objective), "mode": mode_of(cfg)})
    return StagePlan(FlowMatching(model, cfg.flow, obj), source)


def make_pairs(cfg: C.RunConfig, source=None, teacher: Denoiser | None = None, *, write: bool = True,
               rank: int = 0, world: int = 1):
    """Generate (or finish) the ODE-pair store of an `ode` stage and return it (method.md §5.1); resumable.

    The store folder is written under its own lock (train/lock.py, architecture.md §5): a second process
    filling it at the same time is refused, naming the owner, before it writes anything. Under torchrun rank r
    of `world` fills the shards i with i % world == r under its own lock (shard i depends on (seed, i) only, so
    the store is the same however it is split); `write=False` opens a store that is already complete."""
    from .data.trajectories import PairStore
    from .objectives.ode import TEACHERS, write_pairs
    from .train.lock import run_lock

    o = cfg.ode
    if o.teacher_kind not in TEACHERS:
        raise ConfigError(f"ode.teacher_kind must be one of {TEACHERS}, got {o.teacher_kind!r}")
    teacher = teacher if teacher is not None or not write else load_role(cfg, ODE_TEACHER)
    source = source or build_data(cfg)
    anchors = ode_anchors(cfg)
    manifest = {"teacher": str(ckpt.resolve(o.teacher)), "teacher_kind": o.teacher_kind,
                "grid_steps": o.grid_steps, "shift": cfg.flow.shift, "anchors": anchors.tolist(),
                "guidance": o.guidance, "block_size": cfg.objective.block_size, "num_pairs": o.num_pairs,
                "shard_size": o.shard_size, "seed": cfg.train.seed, "data": C.to_dict(cfg.data)}
    root = o.pairs_dir or cfg.run_dir / "pairs"
    if not write:
        return PairStore(root, manifest)
    lock_dir = root if world == 1 else Path(root) / f".rank{rank}"  # torchrun: one lock per rank's shards
    with run_lock(lock_dir, doing="filled with ODE pairs"):
        store = PairStore(root, manifest)  # under torchrun rank 0 created it before the others open it
        write_pairs(store, teacher, source, block_size=cfg.objective.block_size, steps=o.grid_steps,
                    shift=cfg.flow.shift, anchors=anchors, guidance=o.guidance, seed=cfg.train.seed,
                    mode=o.pair_mode, teacher_kind=o.teacher_kind, progress=cfg.train.progress and rank == 0,
                    rank=rank, world=world)
    return store


def _ode(cfg: C.RunConfig, model: Denoiser, source, roles) -> StagePlan:
    from .data.trajectories import PairSource
    from .objectives.ode import ODERegression

    teacher, dist = roles["teacher"], distributed.init(cfg.train.device)
    if any(p.is_meta for p in teacher.parameters()):  # torchrun: every rank makes its shards of the pairs with a
        teacher = load_role(cfg, ODE_TEACHER, device=dist.device)  # whole teacher on its own device
    if dist.active and dist.main:
        make_pairs(cfg, source, write=False)  # creates the store (its manifest) once, before the ranks fill it
    dist.barrier()
    store = make_pairs(cfg, source, teacher, rank=dist.rank, world=dist.world)
    dist.barrier()  # every rank's shards are in place before PairSource checks the store
    objective = ODERegression(model, anchors=ode_anchors(cfg), block_size=cfg.objective.block_size,
                              teacher_kind=cfg.ode.teacher_kind)
    return StagePlan(objective, PairSource(store))


def _cd(cfg: C.RunConfig, model: Denoiser, source, roles) -> StagePlan:
    from .objectives.consistency import CausalCD

    c = cfg.cd
    objective = CausalCD(model, roles["teacher"], steps=c.grid_steps, shift=cfg.flow.shift,
                         block_size=cfg.objective.block_size, guidance=c.guidance, target_decay=c.target_decay,
                         few_step_sigmas=ode_anchors(cfg), boundary_pair=c.boundary_pair,
                         motion=(cfg.objective.motion_weight, cfg.objective.motion_threshold))
    return StagePlan(objective, source)


def _dmd(cfg: C.RunConfig, model: Denoiser, source, roles) -> StagePlan:
    from .objectives.dmd import AsymmetricDMD

    d = cfg.dmd
    critic = roles["critic"].train()
    for p in critic.parameters():
        p.requires_grad_(True)
    sig, first = few_step_schedule(cfg)
    objective = AsymmetricDMD(model, critic, roles["real"], sigmas=sig, first_sigmas=first,
                              block_size=cfg.objective.block_size, shift=cfg.flow.shift,
                              real_guidance=d.real_guidance, critic_ratio=d.critic_ratio, sigma_min=d.sigma_min,
                              sigma_max=d.sigma_max, context_sigma=d.context_sigma,
                              num_train_timesteps=cfg.flow.num_train_timesteps,
                              causal_scores=d.score_kind == "causal")
    return StagePlan(objective, source, {"critic": OptimSpec(d.critic_lr, tuple(d.critic_betas),
                                                             cfg.train.weight_decay)})


def _fixed(kind: str) -> Callable[[C.RunConfig], str]:
    return lambda cfg: kind


def _ode_teacher_kind(cfg: C.RunConfig) -> str:
    return "bidirectional" if cfg.ode.teacher_kind == "bidirectional" else "causal"


KIND_STAGE = {"bidirectional": "stage0", "causal": "stage1"}  # the recipe stage that fills a role of that kind


def _dmd_score_kind(cfg: C.RunConfig) -> str:
    return cfg.dmd.score_kind  # bidirectional (the base, method.md §7.1) | causal (the AR teacher)


ODE_TEACHER = Role("ode.teacher", _ode_teacher_kind, lambda cfg: KIND_STAGE[_ode_teacher_kind(cfg)])

register(Stage("stage0", ("bidirectional",), False, _flow_matching, LossRule("no_rise", halve_from_scratch=True),
               help="bidirectional base, flow matching"))
register(Stage("stage1", CAUSAL_MODES, False, _flow_matching, LossRule("no_rise"),
               help="AR model, teacher forcing (objective.mode=diffusion_forcing: the DF baseline)"))
register(Stage("ode", ("teacher_forcing",), True, _ode, LossRule("no_rise"), section="ode", roles=(ODE_TEACHER,),
               needs_init=True, help="few-step init by regression on the teacher's ODE pairs"))
register(Stage("cd", ("teacher_forcing",), True, _cd, LossRule("stable"), section="cd",
               roles=(Role("cd.teacher", _fixed("causal"), _fixed("stage1")),), needs_init=True,
               help="few-step init by causal consistency distillation"))
register(Stage("dmd", ("teacher_forcing",), True, _dmd, LossRule("critic_stable"), section="dmd",
               roles=tuple(Role(key, _dmd_score_kind, lambda cfg: KIND_STAGE[_dmd_score_kind(cfg)])
                           for key in ("dmd.real", "dmd.critic")),
               needs_init=True, help="asymmetric DMD with self-rollout"))
