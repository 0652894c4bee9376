"""Runs: train one stage into its run folder, or a recipe's stages in order (`framecast pipeline`).

Each stage writes `runs/<name>/<stage or tag>/` with config.yaml, metrics.jsonl, ckpt/, samples/, loss.png
(architecture.md §5). Its checkpoints carry the run's `SamplingSpec`, so `framecast sample` needs nothing
but the checkpoint.

`run_recipe` runs a recipe's stages in order, each initialised from the previous checkpoint and resumable
stage by stage: a finished stage with the same settings is reused, an unfinished one continues from its
newest checkpoint, and a finished one with other settings is an error (never overwritten). "The same
settings" means the same config without runtime-only keys, comparing the sections every stage reads plus the
stage's own section (stages.Stage.section), so a knob of another method never blocks reuse.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import config as C
from . import stages as S
from .errors import CheckpointError
from .eval.health import Health, check_stage
from .generate import build_denoiser, init_from, sample
from .media import grid, plot_metrics, write_video
from .schema import differing_keys
from .spec import SamplingSpec
from .train import checkpoint as ckpt
from .train.lock import run_lock
from .train.loop import Trainer

METHOD_SECTIONS = ("few_step", "ode", "cd", "dmd")  # read only by the stages that name them
RUNTIME_KEYS = ("threads", "progress")  # how a run was executed, not what it trained


def make_sample_fn(cfg: C.RunConfig, spec: SamplingSpec, source, codec):
    """Periodic training samples (gif + mp4) of the run's sample prompts, decoded through the run's codec."""
    prompts = cfg.sample.prompts

    def sample_fn(step: int, roles: dict[str, torch.nn.Module], out_dir: Path) -> None:
        cond, null = source.encode_prompts(prompts)
        latents = sample(roles["model"], spec, cond, null, num_frames=cfg.sample.num_frames, seed=cfg.sample.seed)
        g = grid(codec.decode(latents))
        write_video(g, out_dir / f"step_{step:07d}.gif", fps=cfg.sample.fps)
        write_video(g, out_dir / f"step_{step:07d}.mp4", fps=cfg.sample.fps)

    return sample_fn


def train_stage(cfg: C.RunConfig) -> Path:
    """Train one stage; returns its newest checkpoint directory."""
    st = S.get(cfg.stage)
    cfg = S.normalise(cfg)  # validates the stage and its mode before any work
    torch.manual_seed(cfg.train.seed)  # parameter init
    model = build_denoiser(cfg.model, cfg.train.device)
    if cfg.init:
        init_from(model, cfg.init)
    elif st.needs_init:
        raise C.ConfigError(f"stage {cfg.stage!r} distills an existing model: set init= (a checkpoint path)")
    source = S.build_data(cfg)
    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    with run_lock(run_dir):
        C.dump(cfg, run_dir / "config.yaml")
        plan = st.build(cfg, model, source, S.load_roles(cfg))
        spec = S.sampling_spec(cfg)
        meta = {"stage": cfg.stage, "sampling": spec.to_json()}
        # vector videos are not images: no sample videos (their metrics come from the analytic teachers)
        sample_fn = make_sample_fn(cfg, spec, source, S.codec_for(cfg)) if cfg.data.name == "shapes" else None
        trainer = Trainer(cfg, plan.objective, plan.source, run_dir=run_dir, meta=meta, sample_fn=sample_fn,
                          optim=plan.optim)
        trainer.fit()
        plot_metrics(trainer.metrics_path, run_dir / "loss.png", keys=("loss",))
    return ckpt.resolve(run_dir)


# ------------------------------------------------------------------------------------------------
# Recipes
# ------------------------------------------------------------------------------------------------


@dataclass
class StageResult:
    key: str
    cfg: C.RunConfig
    ckpt: Path
    seconds: float
    reused: bool
    health: Health | None = None


def resolve_refs(cfg: C.RunConfig, done: dict[str, StageResult], key: str) -> C.RunConfig:
    """Fill `@<stage>` references and the usual defaults from the stages already run.

    init: the previous stage; each role of the stage: the last run of the stage kind its record names
    (e.g. the CD teacher: the last stage1; DMD's real score and critic: the last stage0).
    """
    def last(kind: str) -> str:
        found = [r for r in done.values() if r.cfg.stage == kind]
        return str(found[-1].ckpt) if found else ""

    st = S.get(cfg.stage)
    refs = {"init": (cfg.init, str(list(done.values())[-1].ckpt) if cfg.stage != "stage0" and done else "")}
    for role in st.roles:
        refs[role.key] = (S.role_path(cfg, role), last(role.default(cfg)))
    update: dict[str, Any] = {}
    for ref, (v, default) in refs.items():
        if v.startswith("@"):
            if v[1:] not in done:
                raise C.ConfigError(f"stage {key!r}: {ref}={v!r} names no earlier stage of this recipe "
                                    f"(have {sorted(done)})")
            v = str(done[v[1:]].ckpt)
        elif not v:
            v = default
        section, _, name = ref.rpartition(".")
        (update.setdefault(section, {}) if section else update)[name] = v
    return C.from_dict(update, base=cfg)


def identity(cfg: C.RunConfig) -> dict[str, Any]:
    """What makes two runs of a stage the same run: its config without runtime keys and other methods' knobs."""
    st = S.get(cfg.stage)
    d = C.to_dict(cfg)
    keep = {st.section} | ({"few_step"} if st.few_step else set())
    d = {k: v for k, v in d.items() if k not in METHOD_SECTIONS or k in keep}
    d["train"] = {k: v for k, v in d["train"].items() if k not in RUNTIME_KEYS}
    return d


def finished(cfg: C.RunConfig) -> Path | None:
    """The final checkpoint of a finished run with these settings; an error if it was made otherwise."""
    root = cfg.run_dir / "ckpt"
    last = ckpt.latest(root) if (root / "latest").is_file() else None
    if last is None:
        return None
    meta = ckpt.read_meta(last)
    if meta.get("step", 0) > cfg.train.steps:
        raise CheckpointError(f"{cfg.run_dir} holds a run of {meta['step']} steps, more than train.steps="
                              f"{cfg.train.steps}; use another name= or move it away")
    if meta.get("step") != cfg.train.steps:
        return None  # unfinished: the trainer resumes it
    try:
        saved = identity(S.normalise(C.from_dict(C.upgrade(meta.get("config", {}))), stored=True))
    except C.ConfigError as e:
        raise CheckpointError(f"{last} holds a config this framecast cannot read ({e})") from None
    diff = differing_keys(saved, identity(S.normalise(cfg)))
    if diff:
        raise CheckpointError(f"{cfg.run_dir} already holds a finished run with other settings "
                              f"({', '.join(diff[:3])}); use another name= or move it away")
    return last


def run_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = (), *, out_dir: str = "runs",
               only: list[str] | None = None, health_clips: int = 16) -> list[StageResult]:
    """Run a recipe's stages in order (see the module docstring); `only` limits which stages train.

    After each stage its health check (eval/health.py) is printed and kept; `health_clips=0` skips it."""
    recipe = C.load_recipe(path, [f"out_dir={out_dir}", *overrides])
    done: dict[str, StageResult] = {}
    for cfg in recipe.stages:
        key = cfg.tag or cfg.stage
        cfg = resolve_refs(cfg, done, key)
        t0 = time.perf_counter()
        found = finished(cfg)
        if found is None and only is not None and key not in only:
            raise C.ConfigError(f"stage {key!r} is not finished and not among --only {only}")
        if found is not None:
            print(f"== {key}: finished earlier, reusing {found}", flush=True)
            done[key] = StageResult(key, cfg, found, 0.0, True)
        else:
            print(f"== {key} ({cfg.stage}, {S.mode_of(cfg)}): {cfg.train.steps} steps -> {cfg.run_dir}",
                  flush=True)
            done[key] = StageResult(key, cfg, train_stage(cfg), time.perf_counter() - t0, False)
        if health_clips:
            done[key].health = stage_health(done[key], health_clips)
    return list(done.values())


def stage_health(result: StageResult, clips: int = 16) -> Health:
    """The stage's health verdict (eval/health.py), computed once and kept in `<run>/health.json`."""
    path = result.cfg.run_dir / "health.json"
    saved = json.loads(path.read_text()) if path.exists() else None
    if saved is not None and saved.get("checkpoint") == str(result.ckpt):
        h = Health.from_json(saved)
    else:
        st = S.get(result.cfg.stage)
        h = check_stage(result.cfg.run_dir, result.ckpt, st.loss_rule, init=result.cfg.init,
                        compare_init=st.few_step, data=result.cfg.data.name, clips=clips)
    print(h.summary(), flush=True)
    return h
