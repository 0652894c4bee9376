"""The method-agnostic training loop (architecture.md §2).

It knows roles (trainable networks by loss name), optimisers, EMA, clipping, accumulation, logging,
samples and checkpoints; it does not know which method it trains. Per step:

    for micro-batch m:  g = draws(step, m)     # a generator per global sample + the step's shared one (rng.py)
        losses = objective.losses(source.batch(B, g), step, g); (loss / accum).backward()
    logs = mean over ranks                      # under torchrun (train/distributed.py); FSDP averages gradients
    for each name returned: clip, optimiser step, EMA update, objective.after_update(name)

All randomness is keyed by (seed, step, sample), so resume is exact and W ranks x batch B draw what one process
with grad_accum W (or batch W*B) draws.

A step that returns only some names (DMD's critic-only steps) steps only those optimisers. The objective
subclasses `Objective` (train/objective.py) and the trainer calls its hooks directly; their defaults do
nothing, so a method overrides only those it needs and no method detail lives in the loop:

    roles            one optimiser per role, keyed by the loss name
    ema_role_names() which roles keep an EMA (`ema_roles`; default all; DMD: the generator only)
    after_update(n)  after each optimiser step of role n (CD: move its target network, method.md §6)
    state_modules()  extra networks saved in and restored from checkpoints as `obj_<name>` (CD: that target)
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..config import ConfigError, RunConfig
from ..rng import Draws
from . import checkpoint as ckpt
from .distributed import SINGLE, Dist, full_value, gradient_sync
from .ema import EMA
from .lock import RunLockedError, run_lock  # noqa: F401  (re-exported)
from .objective import Objective
from .metrics import read_log, truncate_log  # noqa: F401  (re-exported)
from .resume import Checkpointing, TrainingDiverged  # noqa: F401  (re-exported)


@dataclass
class OptimSpec:
    lr: float
    betas: tuple[float, float]
    weight_decay: float


@dataclass
class TrainState:
    step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)


def step_seed(seed: int, step: int) -> int:
    """The seed of step (or shard, or item) `step` of a run seeded `seed`."""
    return seed * 1_000_003 + step


def step_generator(seed: int, step: int) -> torch.Generator:
    """The generator of step (or shard, or item) `step` of a run seeded `seed`: all its randomness, so a resumed
    run draws exactly what the uninterrupted one would have."""
    return torch.Generator().manual_seed(step_seed(seed, step))


def lr_scale(step: int, steps: int, warmup: int, schedule: str = "constant", final: float = 0.0,
             hold: int = 0) -> float:
    """The learning rate of 0-based `step` as a fraction of train.lr: linear warm-up over `warmup` steps, then
    constant or, after `hold` more steps at 1, a half cosine from 1 to `final` at the last step (Loshchilov &
    Hutter 2017, SGDR, without restarts; the hold because the MiniGrid teacher learns its turns at the full rate,
    docs/world_model.md "A held rate"). A pure function of the step, so a resumed run continues the same curve."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    if schedule != "cosine":
        raise ConfigError(f"unknown train.lr_schedule {schedule!r}; choose constant or cosine")
    start = warmup + hold  # config.py refuses a hold that leaves the cosine no steps
    span = max(1, steps - 1 - start)
    progress = min(1.0, max(0.0, (step - start) / span))
    return final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * progress))


class Trainer(Checkpointing):
    def __init__(self, cfg: RunConfig, objective, source, *, run_dir: str | Path, meta: dict[str, Any],
                 sample_fn: Callable[[int, dict[str, nn.Module], Path], None] | None = None,
                 optim: dict[str, OptimSpec] | None = None, dist: Dist = SINGLE) -> None:
        """`objective`: an `Objective` (train/objective.py); the loop calls only its losses and hooks. `dist`:
        this process's rank under torchrun (train/distributed.py), with every network already sharded."""
        if not isinstance(objective, Objective):
            raise TypeError(f"the trainer needs an Objective subclass (framecast.train.objective), got "
                            f"{type(objective).__name__}")
        self.cfg, self.objective, self.source, self.dist = cfg, objective, source, dist
        self.run_dir = Path(run_dir)
        self.meta = meta
        self.sample_fn = sample_fn
        self.roles: dict[str, nn.Module] = dict(objective.roles)
        t = cfg.train
        if t.grad_accum < 1 or t.batch_size < 1 or t.steps < 0:
            raise ConfigError(f"train.batch_size, train.grad_accum must be >= 1 and train.steps >= 0, got "
                             f"{t.batch_size}, {t.grad_accum}, {t.steps}")
        specs = optim or {}
        self.optimizers = {}
        for name, module in self.roles.items():
            spec = specs.get(name, OptimSpec(t.lr, tuple(t.betas), t.weight_decay))
            params = [p for p in module.parameters() if p.requires_grad]
            if not params:
                raise ValueError(f"role {name!r} has no trainable parameters")
            self.optimizers[name] = torch.optim.AdamW(params, lr=spec.lr, betas=spec.betas,
                                                      weight_decay=spec.weight_decay)
        self.base_lr = {n: o.param_groups[0]["lr"] for n, o in self.optimizers.items()}
        ema_roles = objective.ema_role_names()
        self.ema = {n: EMA(self.roles[n], t.ema_decay) for n in ema_roles} if t.ema_decay > 0 else {}
        self.ema_live: set[str] = set()  # roles whose EMA has started (it starts as a copy at train.ema_start)
        self.extra = dict(objective.state_modules())
        self.ckpt_root = self.run_dir / "ckpt"
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.state = TrainState()
        self.last_good: Path | None = None  # the checkpoint resumed from or last saved
        self.window: dict[str, list[float]] = {}  # values since the last log row: rows hold means, so a loss only
        # some steps return (DMD's generator) is never dropped; checkpoints keep it, so resumed rows are the same

    # ---------------------------------------------------------------------------------------------

    def _autocast(self):
        if self.cfg.train.amp == "bf16":
            return torch.autocast(device_type=torch.device(self.cfg.train.device).type, dtype=torch.bfloat16)
        if self.cfg.train.amp != "none":
            raise ConfigError(f"unknown train.amp {self.cfg.train.amp!r}; choose none or bf16")
        return contextlib.nullcontext()

    def _set_lr(self, step: int) -> None:
        t = self.cfg.train
        scale = lr_scale(step, t.steps, t.warmup, t.lr_schedule, t.lr_final, t.lr_hold)
        for n, opt in self.optimizers.items():
            for g in opt.param_groups:
                g["lr"] = self.base_lr[n] * scale

    def _log(self, row: dict[str, Any]) -> None:  # read back with read_log
        self.state.history.append(row)
        if not self.dist.main:  # every rank holds the same (reduced) rows; rank 0 writes them
            return
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(row) + "\n")

    # ---------------------------------------------------------------------------------------------

    def fit(self) -> TrainState:
        """Train to `train.steps`, resuming from the newest checkpoint. The caller holds the run's lock
        (train/lock.py: recipe.train_stage takes it, on rank 0, before anything in the run folder is written)."""
        if self.dist.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        self.dist.barrier()
        return self._fit()

    def _fit(self) -> TrainState:
        t = self.cfg.train
        if t.threads > 0:
            torch.set_num_threads(t.threads)
        start = self.resume()
        for m in self.roles.values():
            m.train()
        last_saved = start if start > 0 else -1
        from tqdm.auto import tqdm

        bar = tqdm(total=t.steps, initial=start, disable=not (t.progress and self.dist.main),
                   desc=f"{self.cfg.stage}", dynamic_ncols=True, leave=True)
        t0 = time.perf_counter()
        for step in range(start, t.steps):
            ckpt._fault(ckpt.STEP_FAULT)  # FRAMECAST_FAULT=step:<n>: a kill between checkpoints (tests)
            sums = self._step(step)
            if self._after_step(step, sums, first=step == 0, bar=bar, t0=t0):
                last_saved = step + 1
        bar.close()
        self.state.step = t.steps
        if t.steps != last_saved and t.steps > start:
            self.save(t.steps)
        if self.sample_fn:
            self._sample(t.steps)
        return self.state

    def _step(self, step: int) -> dict[str, float]:
        """One optimisation step: the micro-batches' gradients, then each returned role's update.

        Returns the step's logs, `<role>/<key>` averaged over the micro-batches and ranks, plus `<role>/grad_norm`.
        """
        self._set_lr(step)
        sums: dict[str, float] = {}
        names = self._accumulate(step, sums)
        sums = self.dist.mean(sums)
        for name in names:
            self._update(name, step, sums)
        return sums

    def draws(self, step: int, micro: int) -> Draws:
        """The randomness of micro-batch `micro` of this rank at `step`: one generator per global sample index and
        the step's shared one, so the numbers do not depend on how the global batch is split (rng.py)."""
        t, w = self.cfg.train, self.dist.world
        return Draws.for_samples(t.seed, step, self.dist.sample_range(micro, t.grad_accum, t.batch_size),
                                 global_batch=t.batch_size * t.grad_accum * w,
                                 shared_seed=step_seed(t.seed, step))

    def _accumulate(self, step: int, sums: dict[str, float]) -> list[str]:
        """Backward `train.grad_accum` micro-batches; returns the loss names of the last one. Under torchrun
        each rank's gradients are reduce-scattered once, after its last micro-batch."""
        t = self.cfg.train
        names: list[str] = []
        for micro in range(t.grad_accum):
            g = self.draws(step, micro)
            if self.dist.active:
                gradient_sync(self.roles.values(), micro == t.grad_accum - 1)
            batch = self.source.batch(t.batch_size, g).to(self.dist.device if self.dist.active else t.device)
            with self._autocast():
                losses = self.objective.losses(batch, step, g)
            unknown = set(losses) - set(self.optimizers)
            if unknown:
                raise KeyError(f"objective returned losses {sorted(unknown)} with no trainable role")
            for name, (loss, logs) in losses.items():
                if not torch.isfinite(loss):
                    raise self._diverged(f"loss {name!r} is {loss.item()}", step + 1)
                (loss / t.grad_accum).backward()
                for k, v in logs.items():
                    sums[f"{name}/{k}"] = sums.get(f"{name}/{k}", 0.0) + v / t.grad_accum
            names = list(losses)
        return names

    def _update(self, name: str, step: int, sums: dict[str, float]) -> None:
        """Clip, step and zero role `name`'s optimiser, update its EMA, then the objective's `after_update`."""
        t = self.cfg.train
        params = [p for p in self.roles[name].parameters() if p.requires_grad]
        gn = torch.nn.utils.clip_grad_norm_(params, t.grad_clip) if t.grad_clip > 0 else None
        gn = None if gn is None else full_value(gn)  # sharded parameters: the norm is a DTensor
        if gn is not None and not torch.isfinite(gn):  # the clipped update would be NaN
            raise self._diverged(f"the gradient norm of {name!r} is {float(gn)}", step + 1)
        self.optimizers[name].step()
        self.optimizers[name].zero_grad(set_to_none=True)
        if gn is not None:
            sums[f"{name}/grad_norm"] = float(gn)
        if name in self.ema and step >= t.ema_start:
            if name in self.ema_live:
                self.ema[name].update(self.roles[name])
            else:  # the EMA is created from the weights at its first update after ema_start (method.md §7.5)
                self.ema[name].reset(self.roles[name])
                self.ema_live.add(name)
        self.objective.after_update(name)

    def _after_step(self, step: int, sums: dict[str, float], *, first: bool, bar, t0: float) -> bool:
        """Progress bar, log row (the means of `self.window`, which it then empties), samples and checkpoint after
        `step`; `first`: the run's first step. Returns whether a checkpoint was saved."""
        t, window = self.cfg.train, self.window
        done = step + 1
        bar.update(1)
        main = next((v for k, v in sums.items() if k.endswith("/loss")), None)
        if main is not None and math.isfinite(main):
            bar.set_postfix(loss=f"{main:.4f}")
        for k, v in sums.items():
            window.setdefault(k, []).append(v)
        if first or done % max(t.log_every, 1) == 0 or done == t.steps:
            means = {k: sum(v) / len(v) for k, v in window.items()}
            self._log({"step": done, "time": round(time.perf_counter() - t0, 3), **means})
            window.clear()
        if t.sample_every and done % t.sample_every == 0 and done != t.steps and self.sample_fn:
            self._sample(done)
        if t.ckpt_every and done % t.ckpt_every == 0 and done != t.steps:
            self.save(done)
            return True
        return False

    def _sample(self, step: int) -> None:
        """Samples come from the EMA weights where they exist (what the checkpoint samples with by default)."""
        modules = dict(self.roles)
        saved = {}
        for n, m in modules.items():
            m.eval()
            if n in self.ema_live:
                saved[n] = {k: v.detach().clone() for k, v in m.state_dict().items()}
                self.ema[n].copy_to(m)
        try:
            self.sample_fn(step, modules, self.run_dir / "samples")
        finally:
            for n, m in modules.items():
                if n in saved:
                    m.load_state_dict(saved[n])
                m.train()
