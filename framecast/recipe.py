"""Runs: train one stage into its run folder, or a recipe's stages in order (`framecast pipeline`).

Each stage writes `runs/<name>/<stage or tag>/` with config.yaml, metrics.jsonl, ckpt/, samples/, loss.png
(architecture.md §5). Its checkpoints carry the run's `SamplingSpec`, so `framecast sample` needs nothing
but the checkpoint.

A run folder is written by one process at a time, under its lock (train/lock.py), and only once the config
has passed every check; one that already holds checkpoints continues only under the settings it was trained
with (runs.py says what "the same settings" means).

`run_recipe` runs a recipe's stages in order, each initialised from the previous checkpoint and resumable
stage by stage: a finished stage with the same settings is reused, an unfinished one continues from its
newest checkpoint, and a finished one with other settings is an error (never overwritten). Its `--only`
names and every stage's `@<stage>` references are checked before any stage trains. A stage with `use:` is
not trained: an existing model of its kind stands in for it (`stage0: {use: pretrained:toy-base}`), as a
pretrained Wan2.1 does for a user's Stage 0.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from . import config as C
from . import pretrained
from . import stages as S
from .eval.health import Health, check_stage
from .generate import build_denoiser, describe, sample
from .media import grid, plot_metrics, write_video
from .models.transformer import capacity_problem
from .runs import check_resume, finished
from .schema import differing_keys
from .spec import SamplingSpec
from .train import checkpoint as ckpt
from .train import distributed
from .train.lock import run_lock
from .train.loop import Trainer
from .train.sharded_load import load_into, shard_and_load


def make_sample_fn(cfg: C.RunConfig, spec: SamplingSpec, source, codec, *, write: bool = True):
    """Periodic training samples (gif + mp4) of the run's sample prompts, decoded through the run's codec.
    Under torchrun every rank runs the sharded networks and only rank 0 (`write`) decodes and writes."""
    prompts = cfg.sample.prompts

    def sample_fn(step: int, roles: dict[str, torch.nn.Module], out_dir: Path) -> None:
        cond, null = source.encode_prompts(prompts)
        latents = sample(roles["model"], spec, cond, null, num_frames=cfg.sample.num_frames, seed=cfg.sample.seed)
        if not write:
            return
        out_dir.mkdir(parents=True, exist_ok=True)  # the latents too: what a checkpoint's sampling is compared with
        save_file({"latents": latents.float().cpu().contiguous()}, str(out_dir / f"step_{step:07d}.safetensors"))
        g = grid(codec.decode(latents))
        write_video(g, out_dir / f"step_{step:07d}.gif", fps=cfg.sample.fps)
        write_video(g, out_dir / f"step_{step:07d}.mp4", fps=cfg.sample.fps)

    return sample_fn


def train_stage(cfg: C.RunConfig, *, allow_change: bool = False) -> Path:
    """Train one stage, or continue its run; returns its newest checkpoint directory.

    Everything that can refuse the config (values, model, init, data, roles) runs before the run folder is
    touched; then its lock is taken, what the folder holds is checked (`check_resume`: a run trained with
    other settings, or with more steps, is refused unless `allow_change` allows the settings deliberately),
    and only then is anything written, config.yaml last before training (architecture.md §5).
    """
    st = S.get(cfg.stage)
    # validates the stage, its mode and, rebuilt through the schema, every value rule (also for a config changed
    # after loading) before any work
    cfg = S.normalise(cfg)
    dist = distributed.init(cfg.train.device, shard_group=cfg.dist.shard_group)  # one process unless torchrun
    torch.manual_seed(cfg.train.seed)  # parameter init
    lazy = dist.active  # torchrun: networks with weights to load start on the meta device (train/sharded_load.py)
    if problem := capacity_problem(cfg.model):  # trains, but to a floor the steps cannot lower
        print(f"warning: model: {problem}", flush=True)
    model = build_denoiser(cfg.model, "meta" if lazy and cfg.init else dist.device if lazy else cfg.train.device)
    if cfg.init and not lazy:
        print(f"init: {load_into(model, cfg.init, dist)}", flush=True)  # framecast, DCP or Wan (its EMA if kept)
    elif st.needs_init and not cfg.init:
        raise C.ConfigError(f"stage {cfg.stage!r} distills an existing model: set init= (a checkpoint path)")
    source = S.build_data(cfg)
    roles = S.load_roles(cfg, meta=lazy)  # read only; loaded where the original order drew them (the global RNG)
    sources = {id(model): cfg.init} if lazy and cfg.init else {}
    sources.update({id(roles[r.key.split(".")[1]]): S.role_path(cfg, r) for r in st.roles} if lazy else {})
    run_dir = cfg.run_dir
    with run_lock(run_dir) if dist.main else contextlib.nullcontext():  # rank 0 owns the run folder
        check_resume(cfg, allow_change=allow_change)
        plan = st.build(cfg, model, source, roles)
        shard_and_load(plan.objective, dist, sources, model, mixed_precision=cfg.dist.mixed_precision,
                       reshard_after_forward=cfg.dist.reshard_after_forward)
        spec = S.sampling_spec(cfg)
        meta = {"stage": cfg.stage, "sampling": spec.to_json()}
        # vector videos are not images: no sample videos (their metrics come from the analytic teachers)
        sample_fn = make_sample_fn(cfg, spec, source, S.codec_for(cfg), write=dist.main) \
            if cfg.data.name == "shapes" else None
        trainer = Trainer(cfg, plan.objective, plan.source, run_dir=run_dir, meta=meta, sample_fn=sample_fn,
                          optim=plan.optim, dist=dist)
        if dist.main:
            run_dir.mkdir(parents=True, exist_ok=True)
            C.dump(cfg, run_dir / "config.yaml")  # the lock is held and the config passed every check
        trainer.fit()
        if dist.main:
            plot_metrics(trainer.metrics_path, run_dir / "loss.png", keys=("loss",))
    dist.barrier()
    return ckpt.resolve(run_dir)


# ------------------------------------------------------------------------------------------------
# What a run folder already holds, against the settings it is run with again (architecture.md §5)
# ------------------------------------------------------------------------------------------------



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

    @property
    def ref(self) -> str:
        """How later stages name this one: the `use:` name of a stage that is an existing model (so that their
        identity does not depend on where the package lives), else the checkpoint's path."""
        return self.cfg.use or str(self.ckpt)


def resolve_refs(cfg: C.RunConfig, done: dict[str, StageResult], key: str) -> C.RunConfig:
    """Fill `@<stage>` references and the usual defaults from the stages already run.

    init: the previous stage; each role of the stage: the last run of the stage kind its record names
    (e.g. the CD teacher: the last stage1; DMD's real score and critic: the last stage0).
    """
    def last(kind: str) -> str:
        found = [r for r in done.values() if r.cfg.stage == kind]
        return found[-1].ref if found else ""

    st = S.get(cfg.stage)
    refs = {"init": (cfg.init, list(done.values())[-1].ref if cfg.stage != "stage0" and done else "")}
    for role in st.roles:
        refs[role.key] = (S.role_path(cfg, role), last(role.default(cfg)))
    update: dict[str, Any] = {}
    for ref, (v, default) in refs.items():
        if v.startswith("@"):
            if v[1:] not in done:
                raise C.ConfigError(f"stage {key!r}: {ref}={v!r} names no earlier stage of this recipe "
                                    f"(have {sorted(done)})")
            v = done[v[1:]].ref
        elif not v:
            v = default
        if pretrained.is_name(v):  # tied to the weights shipped now: a replaced shipped model is another run
            v = pretrained.pinned(v)
        section, _, name = ref.rpartition(".")
        (update.setdefault(section, {}) if section else update)[name] = v
    return C.from_dict(update, base=cfg)


def split_only(values: list[str] | None) -> tuple[list[str] | None, list[str]]:
    """`pipeline --only a b key=value` as argparse reads it (nargs="+" takes the overrides after the names too):
    (the stage names, the overrides). None stays None (no --only); `--only` with no stage name is an error."""
    if values is None:
        return None, []
    names = [v for v in values if "=" not in v]
    if not names:
        raise C.ConfigError(f"--only needs at least one stage name before any key=value override, got {values}")
    return names, [v for v in values if "=" in v]


def _check_stage_refs(stages: list[C.RunConfig], keys: list[str], i: int) -> None:
    """Stage i's `@<stage>` references name earlier stages (of the kind of model each role needs) and every
    path it leaves empty has an earlier stage to fill it (resolve_refs)."""
    cfg, key, earlier = stages[i], keys[i], keys[:i]
    st = S.get(cfg.stage)
    refs = {"init": (cfg.init, None)} | {r.key: (S.role_path(cfg, r), r) for r in st.roles}
    for ref, (v, role) in refs.items():
        if v.startswith("@"):
            if v[1:] not in earlier:
                raise C.ConfigError(f"stage {key!r}: {ref}={v!r} names no earlier stage of this recipe "
                                    f"(have {sorted(earlier)})")
            mode = S.mode_of(stages[keys.index(v[1:])])
            want = role.kind(cfg) if role is not None else None
            if want is not None and (mode == "bidirectional") != (want == "bidirectional"):
                raise C.ConfigError(f"stage {key!r}: {ref}={v!r} is a {mode} stage; {ref} needs a {want} model")
        elif not v and role is not None and role.default(cfg) not in {c.stage for c in stages[:i]}:
            raise C.ConfigError(f"stage {key!r} needs {role.key}: set it (a checkpoint path or `@<stage>`) or put "
                                f"a {role.default(cfg)} stage before it")
        elif not v and role is None and st.needs_init and not earlier:
            raise C.ConfigError(f"stage {key!r} distills an existing model: set init= (a checkpoint path) or put "
                                f"the stage it starts from before it")


def check_recipe(stages: list[C.RunConfig], only: list[str] | None = None) -> list[str]:
    """The recipe's stage keys, once everything that can be checked before training is (architecture.md §5):
    `only` names stages of it, and every stage's references can be filled, so a bad one late in the recipe
    is reported before stage0 trains rather than after."""
    keys = [cfg.tag or cfg.stage for cfg in stages]
    unknown = [k for k in only or () if k not in keys]
    if only is not None and (unknown or not only):
        raise C.ConfigError(f"--only {' '.join(unknown or only) or '(nothing)'}: not a stage of this recipe; its "
                            f"stages are {', '.join(keys)}")
    for i in range(len(stages)):
        _check_stage_refs(stages, keys, i)
    return keys


def run_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = (), *, out_dir: str = "runs",
               only: list[str] | None = None, health_clips: int = 16,
               allow_change: bool = False) -> list[StageResult]:
    """Run a recipe's stages in order (see the module docstring); `only` limits which stages train: the stages
    it names start from must be finished (an unfinished one that none of them reads is left alone, e.g. the
    causal chain while `--only ode_sf dmd_sf_2step` trains the baseline), the stages after it are not run.

    `allow_change`: an unfinished stage may continue under changed settings (train_stage). After each stage
    its health check (eval/health.py) is printed and kept; `health_clips=0` skips it."""
    recipe = C.load_recipe(path, [f"out_dir={out_dir}", *overrides])
    keys = check_recipe(recipe.stages, only)
    stop = max(keys.index(k) for k in only) + 1 if only else len(keys)  # later stages feed none of `only`
    done: dict[str, StageResult] = {}
    first = recipe.stages[0]
    dist = distributed.init(first.train.device, shard_group=first.dist.shard_group)  # one process unless torchrun
    pending: dict[str, StageResult] = {}  # unfinished stages outside `only`, kept in order as placeholders
    for key, cfg in zip(keys[:stop], recipe.stages[:stop]):
        cfg = resolve_refs(cfg, done, key)
        reads = _reads_pending(cfg, pending)
        if reads and key in (only or ()):
            raise C.ConfigError(f"stage {reads[0]!r} is not finished and not among --only, and stage {key!r} "
                                f"starts from it; add it to --only or finish it first")
        t0 = time.perf_counter()
        if cfg.use:  # an existing model stands in for this stage (e.g. stage0: {use: pretrained:toy-base})
            done[key] = used_stage(cfg, key)
            if dist.main:  # the stage's run dir then loads as that model (`framecast sample --ckpt runs/<name>/stage0`)
                ckpt.write_used(cfg.run_dir, cfg.use)
            if health_clips and dist.main:
                done[key].health = stage_health(done[key], health_clips)
            continue
        found = None if reads else finished(cfg)
        if found is None and only is not None and key not in only:  # fine unless a stage of `only` reads it
            pending[key] = StageResult(key, cfg, Path(f"<unfinished stage {key}>"), 0.0, False)
            done[key] = pending[key]
            continue
        if found is not None:
            print(f"== {key}: finished earlier, reusing {found}", flush=True)
            done[key] = StageResult(key, cfg, found, 0.0, True)
        else:
            print(f"== {key} ({cfg.stage}, {S.mode_of(cfg)}): {cfg.train.steps} steps -> {cfg.run_dir}",
                  flush=True)
            done[key] = StageResult(key, cfg, train_stage(cfg, allow_change=allow_change),
                                    time.perf_counter() - t0, False)
        if health_clips and dist.main:  # under torchrun rank 0 checks (in one process) while the others wait
            done[key].health = stage_health(done[key], health_clips)
        dist.barrier()
    return [r for k, r in done.items() if k not in pending]


def _reads_pending(cfg: C.RunConfig, pending: dict[str, StageResult]) -> list[str]:
    """The placeholder stages (unfinished, outside `--only`) a resolved stage config reads: an explicit `@` or a
    default (init = the previous stage), so skipping a stage never silently changes what another starts from."""
    text = json.dumps(C.to_dict(cfg))
    return [k for k, r in pending.items() if json.dumps(str(r.ckpt)) in text]


ZERO_INIT_MODEL_KEYS = ("spatial_embed", "action_tokens")  # model switches that add only zero-initialised modules


def used_stage(cfg: C.RunConfig, key: str) -> StageResult:
    """The StageResult of a stage that is the existing checkpoint `cfg.use`: refused unless it is a model of
    the stage's kind (generator mode) and the recipe's network, since later stages build on both."""
    src = ckpt.resolve(cfg.use)
    model, mode = describe(src)  # from its metadata, no weights read
    if mode != S.mode_of(cfg):
        raise C.ConfigError(f"stage {key!r}: use={cfg.use!r} is a {mode} model; the stage is {S.mode_of(cfg)}")
    diff = differing_keys(C.to_dict(model), C.to_dict(cfg.model))
    # a zero-initialised addition the recipe turns on (model.spatial_embed) loads into the used network unchanged
    # (train/sharded_load.ZERO_INIT_ADDITIONS): the later stages start from exactly the used model
    diff = [k for k in diff if not (k in ZERO_INIT_MODEL_KEYS and not getattr(model, k))]
    if diff:
        raise C.ConfigError(f"stage {key!r}: use={cfg.use!r} has another network than the recipe's model "
                            f"(model.{', model.'.join(diff[:6])}); set the recipe's model to the checkpoint's")
    print(f"== {key}: using {cfg.use} ({src})", flush=True)
    return StageResult(key, cfg, src, 0.0, True)


def stage_health(result: StageResult, clips: int = 16) -> Health:
    """The stage's health verdict (eval/health.py), computed once and kept in `<run>/health.json`."""
    path = result.cfg.run_dir / "health.json"
    saved = json.loads(path.read_text()) if path.exists() else None
    if saved is not None and saved.get("checkpoint") == str(result.ckpt):
        h = Health.from_json(saved)
    else:
        st = S.get(result.cfg.stage)
        h = check_stage(result.cfg.run_dir, result.ckpt, st.loss_rule, init=result.cfg.init,
                        compare_init=st.few_step, data=result.cfg.data.name, clips=clips, losses=not result.cfg.use)
    print(h.summary(), flush=True)
    return h
