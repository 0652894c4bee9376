"""Recipes: which networks a stage has, which are frozen, what initialises what, how its checkpoint samples.

    stage0  bidirectional base, flow matching                           (the real score / critic init)
    stage1  AR student from stage0, teacher forcing (or DF baseline)    (the ODE / CD teacher), method.md §4
    ode     few-step init: regression on ODE pairs of the AR teacher    (or the bidirectional baseline), §5
    cd      few-step init: causal consistency distillation from the AR teacher, §6
    dmd     asymmetric DMD with self-rollout: generator from ode/cd, critic + real score from stage0, §7

Each stage writes `runs/<name>/<stage or tag>/` with config.yaml, metrics.jsonl, ckpt/, samples/, loss.png.
The checkpoint's meta says how to sample it (`sampling`): causal or not, block size, window, sampler and
schedule (few-step sigmas and first-block sigmas for distilled generators), so `framecast sample` needs
nothing but the checkpoint, and it refuses to sample a multi-step model as a few-step one unless forced.

`run_recipe` runs the stages of a recipe in order, each initialised from the previous checkpoint and
resumable stage by stage: a finished stage with the same config is reused, an unfinished one continues
from its newest checkpoint, and a finished one with a different config is an error (never overwritten).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import config as C
from . import flow
from .data.sources import build_source
from .media import grid, plot_metrics, write_video
from .models.codecs import IdentityCodec
from .models.conditioning import ActionEmbedder, Cond, build_text_encoder
from .models.denoiser import Denoiser, Guidance
from .models.transformer import build_transformer
from .rollout import generate, rollout
from .sampling import SAMPLERS
from .train import checkpoint as ckpt
from .train.loop import OptimSpec, Trainer

STAGES = ("stage0", "stage1", "ode", "cd", "dmd")
FEW_STEP_STAGES = ("ode", "cd", "dmd")


def build_denoiser(mc: C.ModelConfig, device: str | torch.device = "cpu") -> Denoiser:
    net = build_transformer(mc, device=device)
    actions = ActionEmbedder(mc.num_actions, mc.dim).to(device) if mc.num_actions > 0 else None
    return Denoiser(net, actions)


def build_data(cfg: C.RunConfig):
    """The training source of a run: its data with the text encoder and codec the model expects."""
    text = build_text_encoder(cfg.data.text_encoder, cfg.model.text_dim, cfg.data.text_tokens, cfg.data.seed)
    return build_source(cfg.data, text, IdentityCodec(cfg.model.in_channels), cfg.model.num_actions)


def stage_mode(cfg: C.RunConfig) -> str:
    """The generator's training mode: bidirectional (stage0), TF/DF (stage1), teacher_forcing (distilled)."""
    if cfg.stage not in STAGES:
        raise C.ConfigError(f"unknown stage {cfg.stage!r}; choose one of {list(STAGES)}")
    if cfg.stage == "stage0":
        return "bidirectional"
    if cfg.stage == "stage1":
        return cfg.objective.mode
    return "teacher_forcing"


def few_step_schedule(cfg: C.RunConfig) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(sigmas, first-block sigmas or None) from the warped step lists (method.md §2, §7.6)."""
    d = cfg.distill
    sig = flow.few_step_sigmas(d.denoising_steps, cfg.flow.shift, num_train_timesteps=cfg.flow.num_train_timesteps)
    first = None
    if d.first_block_steps:
        first = flow.few_step_sigmas(d.first_block_steps, cfg.flow.shift,
                                     num_train_timesteps=cfg.flow.num_train_timesteps)
    return sig, first


def ode_anchors(cfg: C.RunConfig) -> torch.Tensor:
    """The ODE anchors: every sigma either schedule visits, largest first (4 for 1/2/4-step models)."""
    sig, first = few_step_schedule(cfg)
    both = sig if first is None else torch.cat([sig, first])
    return torch.unique(both).flip(0)


def sampling_meta(cfg: C.RunConfig) -> dict[str, Any]:
    mode = stage_mode(cfg)
    causal = mode != "bidirectional"
    few = cfg.stage in FEW_STEP_STAGES
    meta = {
        "causal": causal,
        "mode": mode,
        "block_size": cfg.objective.block_size if causal else None,  # None: one block spanning the video
        "window": cfg.objective.window if causal else 0,
        "sink": cfg.objective.sink if causal else 0,
        "sampler": "few_step" if few else "euler",
        "steps": len(cfg.distill.denoising_steps) if few else cfg.sample.steps,
        "shift": cfg.flow.shift,
        "guidance": 1.0 if few else cfg.sample.guidance,  # distilled generators sample without CFG
        "num_frames": cfg.data.num_frames,
        "frame_shape": [cfg.model.in_channels, cfg.data.height, cfg.data.width],
        "text_encoder": cfg.data.text_encoder,
        "text_tokens": cfg.data.text_tokens,
        "few_step": few,
    }
    if few:
        sig, first = few_step_schedule(cfg)
        meta.update(sigmas=sig.tolist(), first_sigmas=None if first is None else first.tolist(),
                    denoising_steps=list(cfg.distill.denoising_steps),
                    first_block_steps=list(cfg.distill.first_block_steps))
    return meta


def init_from(denoiser: Denoiser, path: str) -> Path:
    """Load the weights of another stage's checkpoint (its EMA if it kept one)."""
    src = ckpt.resolve(path)
    meta = ckpt.read_meta(src)
    stem = "ema_model" if "model" in meta.get("ema", []) else "model"
    ckpt.load_weights(denoiser, src, stem)
    return src


def make_sample_fn(cfg: C.RunConfig, meta: dict[str, Any], source):
    prompts = cfg.sample.prompts

    def sample_fn(step: int, roles: dict[str, torch.nn.Module], out_dir: Path) -> None:
        model = roles["model"]
        cond, null = source.encode_prompts(prompts)
        video = sample(model, meta, cond, null, num_frames=cfg.sample.num_frames, seed=cfg.sample.seed)
        g = grid(video)
        write_video(g, out_dir / f"step_{step:07d}.gif", fps=cfg.sample.fps)
        write_video(g, out_dir / f"step_{step:07d}.mp4", fps=cfg.sample.fps)

    return sample_fn


@torch.no_grad()
def sample(model: Denoiser, meta: dict[str, Any], cond: Cond, null: Cond, *, num_frames: int, seed: int = 0,
           steps: int | None = None, guidance: float | None = None, window: int | None = None,
           sink: int | None = None, context: torch.Tensor | None = None, sampler: str | None = None,
           denoising_steps: list[int] | None = None, force: bool = False, as_stream: bool = False):
    """Sample [B, F, C, H, W] as the checkpoint's meta says (streaming with a KV cache for causal models).

    `sampler` / `denoising_steps` override the checkpoint's schedule; asking a multi-step model for
    few-step sampling (or the reverse) raises unless `force` (architecture.md §5).
    """
    C_, H, W = meta["frame_shape"]
    name = sampler or meta["sampler"]
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {sorted(SAMPLERS)}")
    few = meta.get("few_step", False)
    if (name == "few_step") != few and not force:
        kind = "a few-step generator" if few else "a multi-step (Euler) model"
        raise ValueError(f"this checkpoint is {kind} (stage {meta['mode']}); sampling it with {name!r} would not "
                         f"give its distribution; pass force=True (--force) to do it anyway")
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(cond.batch, num_frames, C_, H, W, generator=g).to(cond.text.device)
    first = None
    if name == "few_step":
        first = torch.tensor(meta["first_sigmas"]) if meta.get("first_sigmas") else None  # trained with it
        if denoising_steps:
            sigmas = flow.few_step_sigmas(denoising_steps, meta["shift"]).float()
        elif "sigmas" in meta:
            sigmas = torch.tensor(meta["sigmas"])
        else:
            raise ValueError("this checkpoint has no few-step schedule; give denoising_steps")
    else:
        sigmas = flow.grid(steps or meta["steps"], meta["shift"]).float()
    scale = meta["guidance"] if guidance is None else guidance
    block = meta["block_size"] if meta["causal"] else num_frames
    kw = dict(sampler=SAMPLERS[name], sigmas=sigmas, first_sigmas=first,
              block_size=block, window=meta["window"] if window is None else window,
              sink=meta["sink"] if sink is None else sink, guidance=Guidance(scale, null) if scale != 1.0 else None,
              context=context, generator=g)
    if as_stream:
        return rollout(model, noise, cond, commit_last=False, **kw)
    return generate(model, noise, cond, **kw)


def stream(model: Denoiser, meta: dict[str, Any], cond: Cond, null: Cond, *, num_frames: int, **kw):
    """`sample`, but an iterator of `rollout` blocks, each yielded as soon as it is generated."""
    return sample(model, meta, cond, null, num_frames=num_frames, as_stream=True, **kw)


def text_encoder_for(cfg: C.RunConfig, sampling: dict[str, Any]):
    """The text encoder a checkpoint was trained with (its sampling meta names it; the config sizes it)."""
    return build_text_encoder(sampling["text_encoder"], cfg.model.text_dim, sampling["text_tokens"], cfg.data.seed)


def load_model(path: str | Path, *, use_ema: bool | None = None, device: str = "cpu"):
    """(denoiser, meta, config) from a checkpoint; EMA weights by default when the checkpoint kept them."""
    src = ckpt.resolve(path)
    meta = ckpt.read_meta(src)
    try:
        cfg = C.from_dict(meta["config"])
    except (KeyError, C.ConfigError) as e:
        raise ckpt.CheckpointError(f"{src / ckpt.META} has no usable config ({e})") from None
    model = build_denoiser(cfg.model, device)
    has_ema = "model" in meta.get("ema", [])
    if use_ema and not has_ema:
        raise ckpt.CheckpointError(f"{src} has no EMA weights (it kept {meta.get('ema', [])})")
    ckpt.load_weights(model, src, "ema_model" if (has_ema and use_ema is not False) else "model")
    return model.eval(), meta, cfg


def _load_role(path: str, what: str, want: str, cfg: C.RunConfig) -> Denoiser:
    """A teacher / score network from a checkpoint, checked to be the kind the stage needs."""
    if not path:
        raise C.ConfigError(f"stage {cfg.stage!r} needs distill.{what} (a checkpoint path; in a recipe `@<stage>`)")
    model, meta, tcfg = load_model(path, device=cfg.train.device)
    mode = meta.get("sampling", {}).get("mode")
    ok = mode == "bidirectional" if want == "bidirectional" else mode in ("teacher_forcing", "diffusion_forcing")
    if not ok:
        raise C.ConfigError(f"distill.{what}={path!r} is a {mode!r} model; stage {cfg.stage!r} needs a {want} one")
    if tcfg.model.in_channels != cfg.model.in_channels or tcfg.model.text_dim != cfg.model.text_dim:
        raise C.ConfigError(f"distill.{what}={path!r} has in_channels/text_dim {tcfg.model.in_channels}/"
                            f"{tcfg.model.text_dim}, the student {cfg.model.in_channels}/{cfg.model.text_dim}")
    return model


def make_pairs(cfg: C.RunConfig, source=None):
    """Generate (or finish) the ODE-pair store of an `ode` stage and return it (method.md §5.1); resumable."""
    from .data.trajectories import PairStore
    from .objectives.ode import TEACHERS, write_pairs

    d = cfg.distill
    if d.ode_teacher not in TEACHERS:
        raise C.ConfigError(f"distill.ode_teacher must be one of {TEACHERS}, got {d.ode_teacher!r}")
    want = "bidirectional" if d.ode_teacher == "bidirectional" else "causal"
    teacher = _load_role(d.teacher, "teacher", want, cfg)
    source = source or build_data(cfg)
    anchors = ode_anchors(cfg)
    manifest = {"teacher": str(ckpt.resolve(d.teacher)), "teacher_kind": d.ode_teacher,
                "grid_steps": d.grid_steps, "shift": cfg.flow.shift, "anchors": anchors.tolist(),
                "guidance": d.guidance, "block_size": cfg.objective.block_size, "num_pairs": d.num_pairs,
                "shard_size": d.shard_size, "seed": cfg.train.seed, "data": C.to_dict(cfg.data)}
    store = PairStore(d.pairs_dir or cfg.run_dir / "pairs", manifest)
    write_pairs(store, teacher, source, block_size=cfg.objective.block_size, steps=d.grid_steps,
                shift=cfg.flow.shift, anchors=anchors, guidance=d.guidance, seed=cfg.train.seed,
                mode=d.pair_mode, teacher_kind=d.ode_teacher, progress=cfg.train.progress)
    return store


@dataclass
class StagePlan:
    objective: Any
    source: Any
    optim: dict[str, OptimSpec]


def _plan_stage(cfg: C.RunConfig, model: Denoiser, source) -> StagePlan:
    """The objective, data and optimisers of one stage: everything method-specific lives here."""
    d = cfg.distill
    if cfg.stage in ("stage0", "stage1"):
        from .objectives.diffusion import FlowMatching

        obj_cfg = C.ObjectiveConfig(**{**C.to_dict(cfg.objective), "mode": stage_mode(cfg)})
        return StagePlan(FlowMatching(model, cfg.flow, obj_cfg), source, {})
    if cfg.stage == "ode":
        from .data.trajectories import PairSource
        from .objectives.ode import ODERegression

        store = make_pairs(cfg, source)
        objective = ODERegression(model, anchors=ode_anchors(cfg), block_size=cfg.objective.block_size,
                                  teacher_kind=d.ode_teacher)
        return StagePlan(objective, PairSource(store), {})
    if cfg.stage == "cd":
        from .objectives.consistency import CausalCD

        teacher = _load_role(d.teacher, "teacher", "causal", cfg)
        objective = CausalCD(model, teacher, steps=d.grid_steps, shift=cfg.flow.shift,
                             block_size=cfg.objective.block_size, guidance=d.guidance,
                             target_decay=d.target_decay, few_step_sigmas=ode_anchors(cfg))
        return StagePlan(objective, source, {})
    if cfg.stage == "dmd":
        from .objectives.dmd import AsymmetricDMD

        real = _load_role(d.real, "real", "bidirectional", cfg)
        critic = _load_role(d.critic, "critic", "bidirectional", cfg).train()
        for p in critic.parameters():
            p.requires_grad_(True)
        sig, first = few_step_schedule(cfg)
        objective = AsymmetricDMD(model, critic, real, sigmas=sig, first_sigmas=first,
                                  block_size=cfg.objective.block_size, shift=cfg.flow.shift,
                                  real_guidance=d.real_guidance, critic_ratio=d.critic_ratio,
                                  sigma_min=d.dmd_sigma_min, sigma_max=d.dmd_sigma_max,
                                  context_sigma=d.context_sigma, num_train_timesteps=cfg.flow.num_train_timesteps)
        optim = {"critic": OptimSpec(d.critic_lr, tuple(d.critic_betas), cfg.train.weight_decay)}
        return StagePlan(objective, source, optim)
    raise C.ConfigError(f"unknown stage {cfg.stage!r}; choose one of {list(STAGES)}")


def train_stage(cfg: C.RunConfig) -> Path:
    """Train one stage; returns its newest checkpoint directory."""
    stage_mode(cfg)  # validates the stage name before any work
    torch.manual_seed(cfg.train.seed)  # parameter init
    model = build_denoiser(cfg.model, cfg.train.device)
    if cfg.init:
        init_from(model, cfg.init)
    elif cfg.stage in FEW_STEP_STAGES:
        raise C.ConfigError(f"stage {cfg.stage!r} distills an existing model: set init= (a checkpoint path)")
    source = build_data(cfg)
    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    C.dump(cfg, run_dir / "config.yaml")
    plan = _plan_stage(cfg, model, source)
    meta = {"stage": cfg.stage, "sampling": sampling_meta(cfg)}
    # vector videos are not images: no sample videos for them (their metrics come from the analytic teachers)
    sample_fn = make_sample_fn(cfg, meta["sampling"], source) if cfg.data.name == "shapes" else None
    trainer = Trainer(cfg, plan.objective, plan.source, run_dir=run_dir, meta=meta, sample_fn=sample_fn,
                      optim=plan.optim)
    trainer.fit()
    plot_metrics(trainer.metrics_path, run_dir / "loss.png", keys=("loss",))
    return ckpt.resolve(run_dir)


# ------------------------------------------------------------------------------------------------
# Recipes: `framecast pipeline --recipe configs/<name>.yaml`
# ------------------------------------------------------------------------------------------------


@dataclass
class StageResult:
    key: str
    cfg: C.RunConfig
    ckpt: Path
    seconds: float
    reused: bool
    health: Any = None  # eval.health.Health once checked


REFS = ("init", "distill.teacher", "distill.real", "distill.critic")


def _resolve_refs(cfg: C.RunConfig, done: dict[str, StageResult], key: str) -> C.RunConfig:
    """Fill `@<stage>` references and the usual defaults from the stages already run.

    init: the previous stage; teacher: the last stage1 (the last stage0 for the bidirectional ODE baseline);
    real and critic: the last stage0.
    """
    def last(kind: str) -> str:
        found = [r for r in done.values() if r.cfg.stage == kind]
        return str(found[-1].ckpt) if found else ""

    values = {"init": cfg.init, "distill.teacher": cfg.distill.teacher, "distill.real": cfg.distill.real,
              "distill.critic": cfg.distill.critic}
    defaults = dict.fromkeys(REFS, "")
    if cfg.stage != "stage0" and done:
        defaults["init"] = str(list(done.values())[-1].ckpt)
    if cfg.stage in ("ode", "cd"):
        baseline = cfg.stage == "ode" and cfg.distill.ode_teacher == "bidirectional"
        defaults["distill.teacher"] = last("stage0" if baseline else "stage1")
    if cfg.stage == "dmd":
        defaults["distill.real"] = defaults["distill.critic"] = last("stage0")
    update: dict[str, Any] = {}
    for ref in REFS:
        v = values[ref]
        if v.startswith("@"):
            if v[1:] not in done:
                raise C.ConfigError(f"stage {key!r}: {ref}={v!r} names no earlier stage of this recipe "
                                    f"(have {sorted(done)})")
            v = str(done[v[1:]].ckpt)
        elif not v:
            v = defaults[ref]
        section, _, name = ref.rpartition(".")
        (update.setdefault(section, {}) if section else update)[name] = v
    return C.from_dict(update, base=cfg)


RUNTIME_KEYS = ("threads", "progress")  # how a run was executed, not what it trained


def _identity(cfg: dict[str, Any]) -> dict[str, Any]:
    """A config without its runtime-only keys: reusing a finished stage compares these."""
    train = {k: v for k, v in cfg.get("train", {}).items() if k not in RUNTIME_KEYS}
    return {**cfg, "train": train}


def _finished(cfg: C.RunConfig) -> Path | None:
    """The final checkpoint of a finished run with this exact config; an error if it was made otherwise."""
    root = cfg.run_dir / "ckpt"
    last = ckpt.latest(root) if (root / "latest").is_file() else None
    if last is None:
        return None
    meta = ckpt.read_meta(last)
    if meta.get("step", 0) > cfg.train.steps:
        raise ckpt.CheckpointError(f"{cfg.run_dir} holds a run of {meta['step']} steps, more than train.steps="
                                   f"{cfg.train.steps}; use another name= or move it away")
    if meta.get("step") != cfg.train.steps:
        return None  # unfinished: the trainer resumes it
    saved, now = _identity(meta.get("config", {})), _identity(C.to_dict(cfg))
    if saved != now:
        diff = sorted([k for k in now if not isinstance(now[k], dict) and saved.get(k) != now[k]]
                      + [f"{s}.{k}" for s in now if isinstance(now[s], dict) for k in now[s]
                         if not isinstance(saved.get(s), dict) or saved[s].get(k) != now[s][k]])
        raise ckpt.CheckpointError(f"{cfg.run_dir} already holds a finished run with other settings "
                                   f"({', '.join(diff[:3]) or 'different config'}); use another name= or "
                                   f"move it away")
    return last


def run_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = (), *, out_dir: str = "runs",
               only: list[str] | None = None, health_clips: int = 16) -> list[StageResult]:
    """Run a recipe's stages in order (see the module docstring); `only` limits which stages train.

    After each stage its health check (eval/health.py) is printed and kept; `health_clips=0` skips it."""
    recipe = C.load_recipe(path, [f"out_dir={out_dir}", *overrides])
    done: dict[str, StageResult] = {}
    for cfg in recipe.stages:
        key = cfg.tag or cfg.stage
        cfg = _resolve_refs(cfg, done, key)
        t0 = time.perf_counter()
        found = _finished(cfg)
        if found is None and only is not None and key not in only:
            raise C.ConfigError(f"stage {key!r} is not finished and not among --only {only}")
        if found is not None:
            print(f"== {key}: finished earlier, reusing {found}", flush=True)
            done[key] = StageResult(key, cfg, found, 0.0, True)
        else:
            print(f"== {key} ({cfg.stage}, {stage_mode(cfg)}): {cfg.train.steps} steps -> {cfg.run_dir}",
                  flush=True)
            done[key] = StageResult(key, cfg, train_stage(cfg), time.perf_counter() - t0, False)
        if health_clips:
            done[key].health = stage_health(done[key], health_clips)
    return list(done.values())


def stage_health(result: StageResult, clips: int = 16):
    """The stage's health verdict (eval/health.py), computed once and kept in `<run>/health.json`."""
    from .eval.health import Health, check_stage

    path = result.cfg.run_dir / "health.json"
    saved = json.loads(path.read_text()) if path.exists() else None
    if saved is not None and saved.get("checkpoint") == str(result.ckpt):
        h = Health.from_json(saved)
    else:
        h = check_stage(result.cfg.run_dir, result.ckpt, result.cfg.stage, init=result.cfg.init,
                        data=result.cfg.data.name, clips=clips)
    print(h.summary(), flush=True)
    return h
