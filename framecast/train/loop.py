"""The method-agnostic training loop (architecture.md §2).

It knows roles (trainable networks by loss name), optimisers, EMA, clipping, accumulation, logging,
samples and checkpoints; it does not know which method it trains. Per step:

    g = Generator(seed, step)                              # all randomness of the step, so resume is exact
    for micro-batch: losses = objective.losses(source.batch(B, g), step, g); (loss / accum).backward()
    for each name returned: clip, optimiser step, EMA update, objective.after_update(name)

A step that returns only some names (DMD's critic-only steps) steps only those optimisers. The objective
subclasses `Objective` (train/objective.py) and the trainer calls its hooks directly; their defaults do nothing, so a method overrides only those it needs and
no method detail lives in the loop:

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

from ..config import ConfigError, RunConfig, from_dict, to_dict, upgrade
from ..errors import UserError
from . import checkpoint as ckpt
from .ema import EMA
from .lock import RunLockedError, run_lock  # noqa: F401  (re-exported)
from .objective import Objective


class TrainingDiverged(UserError, FloatingPointError):
    """A loss, gradient norm or weight became NaN/inf; names it, the step and the last good checkpoint (kept)."""


@dataclass
class OptimSpec:
    lr: float
    betas: tuple[float, float]
    weight_decay: float


@dataclass
class TrainState:
    step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)


def step_generator(seed: int, step: int) -> torch.Generator:
    """The generator of step (or shard, or item) `step` of a run seeded `seed`: all its randomness, so a resumed
    run draws exactly what the uninterrupted one would have."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


class Trainer:
    def __init__(self, cfg: RunConfig, objective, source, *, run_dir: str | Path, meta: dict[str, Any],
                 sample_fn: Callable[[int, dict[str, nn.Module], Path], None] | None = None,
                 optim: dict[str, OptimSpec] | None = None) -> None:
        """`objective`: an `Objective` (train/objective.py); the loop calls only its losses and hooks."""
        if not isinstance(objective, Objective):
            raise TypeError(f"the trainer needs an Objective subclass (framecast.train.objective), got "
                            f"{type(objective).__name__}")
        self.cfg, self.objective, self.source = cfg, objective, source
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
        warm = self.cfg.train.warmup
        scale = min(1.0, (step + 1) / warm) if warm > 0 else 1.0
        for n, opt in self.optimizers.items():
            for g in opt.param_groups:
                g["lr"] = self.base_lr[n] * scale

    def save(self, step: int) -> Path:
        weights = {n: m.state_dict() for n, m in self.roles.items()}
        weights.update({f"ema_{n}": e.state_dict() for n, e in self.ema.items()})
        weights.update({f"obj_{n}": m.state_dict() for n, m in self.extra.items()})
        for stem, sd in weights.items():  # a diverged run never replaces the last good checkpoint
            if not all(bool(torch.isfinite(v).all()) for v in sd.values() if v.is_floating_point()):
                raise self._diverged(f"the weights {stem!r} are not finite", step)
        meta = {**self.meta, "config": to_dict(self.cfg), "roles": sorted(self.roles),
                "ema": sorted(self.ema)}
        state = {"step": step, "optimizers": {n: o.state_dict() for n, o in self.optimizers.items()},
                 "ema_live": sorted(self.ema_live), "log_window": {k: list(v) for k, v in self.window.items()}}
        if self.metrics_path.is_file():  # the rows up to `step` are as durable as its checkpoint
            ckpt.fsync_file(self.metrics_path)
        self.last_good = ckpt.save(self.ckpt_root, step, weights=weights, meta=meta, state=state)
        return self.last_good

    def _diverged(self, what: str, step: int) -> TrainingDiverged:
        good = self.last_good or "none (no checkpoint was saved yet)"
        return TrainingDiverged(f"training diverged: {what} at step {step}; the last good checkpoint is {good}, "
                                f"left untouched (resume from it with a lower train.lr or a train.grad_clip and --allow-config-change, or "
                                f"use another name=)")

    def resume(self) -> int:
        """Continue from the newest intact checkpoint of this run, if any; returns the step to start at.

        What interrupted saves left is removed first; newer checkpoints that are incomplete or do not load
        are moved aside with a warning (their steps are trained and saved again); the `latest` pointer is set
        to the checkpoint resumed from and metrics.jsonl drops the rows of the steps that are redone
        (architecture.md §5). The caller holds the run lock."""
        root = self.ckpt_root
        ckpt.clean(root)
        bad, found = [], None
        for path, why in ckpt.scan(root):
            if why is None:
                try:
                    found = path, self._read(path)
                    break
                except ckpt.CorruptCheckpoint as e:
                    why = str(e)
            bad.append((path, why))
        step = self._apply(*found) if found else 0
        for path, why in bad:
            aside = ckpt.move_aside(path)
            ckpt.warn_bad(path, why, f"moved aside to {aside.name}; resuming from "
                                     f"{found[0].name if found else 'the start'}")
        ckpt.point(root, found[0].name if found else None)
        truncate_log(self.metrics_path, step)
        return step

    def _read(self, path: Path) -> dict[str, Any]:
        """What the trainer restores from checkpoint `path`, read (and so checked) before any of it is applied."""
        saved = ckpt.read_meta(path)
        try:  # configs stored by older versions are upgraded before the comparison (config.upgrade)
            saved_model = to_dict(from_dict(upgrade(saved.get("config", {}))))["model"]
        except ConfigError as e:
            raise ckpt.CheckpointError(f"{path} holds a config this framecast cannot read ({e})") from None
        if saved_model != to_dict(self.cfg)["model"]:
            raise ckpt.CheckpointError(f"{path} was trained with a different model config; use another run name "
                                       f"(name=...) instead of resuming it")
        stems = [*self.roles, *(f"ema_{n}" for n in self.ema), *(f"obj_{n}" for n in self.extra)]
        return {"weights": {s: ckpt.load_state_dict(path, s) for s in stems}, "state": ckpt.load_state(path)}

    def _apply(self, path: Path, saved: dict[str, Any]) -> int:
        w, state = saved["weights"], saved["state"]
        for n, m in self.roles.items():
            ckpt.fit_weights(m, w[n], path / f"{n}.safetensors")
        for n, e in self.ema.items():
            e.load_state_dict(w[f"ema_{n}"])
        for n, m in self.extra.items():
            ckpt.fit_weights(m, w[f"obj_{n}"], path / f"obj_{n}.safetensors")
        for n, o in self.optimizers.items():
            o.load_state_dict(state["optimizers"][n])
        older = sorted(self.ema) if int(state["step"]) > self.cfg.train.ema_start else []  # checkpoints before
        self.ema_live = set(state.get("ema_live", older))  # `ema_live` was saved: their EMA was already running
        self.window = {k: list(v) for k, v in state.get("log_window", {}).items()}
        self.last_good = path
        return int(state["step"])

    def _log(self, row: dict[str, Any]) -> None:  # read back with read_log
        self.state.history.append(row)
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(row) + "\n")

    # ---------------------------------------------------------------------------------------------

    def fit(self) -> TrainState:
        """Train to `train.steps`, resuming from the newest checkpoint. The caller holds the run's lock
        (train/lock.py: recipe.train_stage takes it before anything in the run folder is written)."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
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

        bar = tqdm(total=t.steps, initial=start, disable=not t.progress, desc=f"{self.cfg.stage}",
                   dynamic_ncols=True, leave=True)
        t0 = time.perf_counter()
        for step in range(start, t.steps):
            sums = self._step(step, step_generator(t.seed, step))
            if self._after_step(step, sums, first=step == 0, bar=bar, t0=t0):
                last_saved = step + 1
        bar.close()
        self.state.step = t.steps
        if t.steps != last_saved and t.steps > start:
            self.save(t.steps)
        if self.sample_fn:
            self._sample(t.steps)
        return self.state

    def _step(self, step: int, g: torch.Generator) -> dict[str, float]:
        """One optimisation step: the micro-batches' gradients, then each returned role's update.

        Returns the step's logs, `<role>/<key>` averaged over the micro-batches, plus `<role>/grad_norm`.
        """
        self._set_lr(step)
        sums: dict[str, float] = {}
        names = self._accumulate(step, g, sums)
        for name in names:
            self._update(name, step, sums)
        return sums

    def _accumulate(self, step: int, g: torch.Generator, sums: dict[str, float]) -> list[str]:
        """Backward `train.grad_accum` micro-batches drawn from `g`; returns the loss names of the last one."""
        t = self.cfg.train
        names: list[str] = []
        for _ in range(t.grad_accum):
            batch = self.source.batch(t.batch_size, g).to(t.device)
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


def read_log(path: str | Path) -> list[dict[str, Any]]:
    """The rows a Trainer logged: `path` is a run directory or its metrics.jsonl."""
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def truncate_log(path: Path, step: int) -> None:
    """Drop the rows of steps after `step` (redone after a resume) and a torn last line, atomically."""
    if not path.is_file():
        return
    text = path.read_text(errors="replace")
    lines = text.splitlines()
    keep = []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and int(row.get("step", 0)) <= step:
            keep.append(line)
    if keep != lines or not text.endswith("\n") and text:  # an unterminated last row would merge with the next
        ckpt.atomic_write_text(path, "".join(f"{line}\n" for line in keep))
