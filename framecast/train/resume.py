"""What a checkpoint holds of a trainer, and resuming from it (architecture.md §5, docs/scaling.md).

The `Trainer` (train/loop.py) inherits these methods. One process writes safetensors checkpoints
(train/checkpoint.py); a run launched by torchrun writes DCP checkpoints (train/dcp.py) holding every rank's
shards. Both hold the same things: each role's weights, its EMA, the objective's extra networks, the optimiser
state, and the trainer state (step, which EMAs started, the unlogged window); the data position and the RNG
are the step number itself (rng.py), so nothing else is needed for an exact resume. Under torchrun, rank 0
decides which checkpoint to resume (scanning, moving damaged ones aside) and every rank loads it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..config import ConfigError, from_dict, to_dict, upgrade
from ..errors import UserError
from . import checkpoint as ckpt
from . import dcp
from ..models.weights import of_tensor
from .metrics import truncate_log
from .sharded_load import fill, shard_like


class TrainingDiverged(UserError, FloatingPointError):
    """A loss, gradient norm or weight became NaN/inf; names it, the step and the last good checkpoint (kept)."""


class Checkpointing:
    """Save and resume for the Trainer (which sets every attribute used here)."""

    def _tensors(self) -> dict[str, dict[str, torch.Tensor]]:
        out = {n: m.state_dict() for n, m in self.roles.items()}
        out.update({f"ema_{n}": e.state_dict() for n, e in self.ema.items()})
        out.update({f"obj_{n}": m.state_dict() for n, m in self.extra.items()})
        return out

    def _templates(self) -> dict[str, dict[str, torch.Tensor]]:
        """Copies of this process's tensors (shards under torchrun) to read a checkpoint into before applying it."""
        return {k: {n: v.detach().clone() for n, v in sd.items()} for k, sd in self._tensors().items()}

    def _trainer_state(self, step: int) -> dict[str, Any]:
        return {"step": step, "ema_live": sorted(self.ema_live),
                "log_window": {k: list(v) for k, v in self.window.items()}}

    def save(self, step: int) -> Path:
        weights = self._tensors()
        bad = dcp.check_finite(weights, self.dist)  # a diverged run never replaces the last good checkpoint
        if bad is not None:
            raise self._diverged(f"the weights {bad!r} are not finite", step)
        meta = {**self.meta, "config": to_dict(self.cfg), "roles": sorted(self.roles), "ema": sorted(self.ema)}
        if self.dist.main and self.metrics_path.is_file():  # the rows up to `step` are as durable as its checkpoint
            ckpt.fsync_file(self.metrics_path)
        if self.dist.launched:
            tensors = {**weights, **{f"optim_{n}": dcp.optimizer_tensors(self.roles[n], o)
                                     for n, o in self.optimizers.items()}}
            self.last_good = dcp.save(self.ckpt_root, step, tensors=tensors, dist=self.dist,
                                      meta={**meta, "trainer_state": self._trainer_state(step)})
            return self.last_good
        state = {**self._trainer_state(step), "optimizers": {n: o.state_dict() for n, o in self.optimizers.items()}}
        self.last_good = ckpt.save(self.ckpt_root, step, weights=weights, meta=meta, state=state)
        return self.last_good

    def _diverged(self, what: str, step: int) -> TrainingDiverged:
        good = self.last_good or "none (no checkpoint was saved yet)"
        return TrainingDiverged(f"training diverged: {what} at step {step}; the last good checkpoint is {good}, "
                                f"left untouched (resume from it with a lower train.lr or a train.grad_clip and "
                                f"--allow-config-change, or use another name=)")

    def resume(self) -> int:
        """Continue from the newest intact checkpoint of this run, if any; returns the step to start at.

        What interrupted saves left is removed first; newer checkpoints that are incomplete or do not load
        are moved aside with a warning (their steps are trained and saved again); the `latest` pointer is set
        to the checkpoint resumed from and metrics.jsonl drops the rows of the steps that are redone
        (architecture.md §5). The caller holds the run lock (rank 0 under torchrun)."""
        root, dist = self.ckpt_root, self.dist
        if dist.main:
            ckpt.clean(root)
        candidates = dist.broadcast([(str(p), why) for p, why in ckpt.scan(root)] if dist.main else None)
        bad, found = [], None
        for p, why in candidates:
            path = Path(p)
            if why is None:
                why = self._try_read(path)
                if not isinstance(why, str):
                    found = path, why
                    break
            bad.append((path, why))
        step = self._apply(*found) if found else 0
        if dist.main:
            for path, why in bad:
                aside = ckpt.move_aside(path)
                ckpt.warn_bad(path, why, f"moved aside to {aside.name}; resuming from "
                                         f"{found[0].name if found else 'the start'}")
            ckpt.point(root, found[0].name if found else None)
            truncate_log(self.metrics_path, step)
        dist.barrier()
        return step

    def _try_read(self, path: Path) -> dict[str, Any] | str:
        """What `_read` returns, or why the checkpoint is corrupt; the same answer on every rank."""
        try:
            out: dict[str, Any] | str = self._read(path)
        except ckpt.CorruptCheckpoint as e:
            out = str(e)
        fails = not self.dist.all_true(not isinstance(out, str))
        return out if not fails else (out if isinstance(out, str) else "unreadable on another rank")

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
        if saved.get("format") == dcp.FORMAT:
            return self._read_dcp(path, saved)
        if self.dist.active:
            return self._read_whole(path)
        stems = [*self.roles, *(f"ema_{n}" for n in self.ema), *(f"obj_{n}" for n in self.extra)]
        return {"weights": {s: ckpt.load_state_dict(path, s) for s in stems}, "state": ckpt.load_state(path)}

    def _read_dcp(self, path: Path, saved: dict[str, Any]) -> dict[str, Any]:
        """Load a DCP checkpoint into templates of this process's shards (DCP reshards across world sizes)."""
        from .dcp_read import index

        stored = set(index(path))
        templates = self._templates()
        for n, m in self.roles.items():
            own = {k.split(".", 1)[1] for k in stored if k.startswith(f"optim_{n}.")}
            templates[f"optim_{n}"] = dcp.optimizer_template(m, own)
        missing = sorted(f"{s}.{k}" for s, sd in templates.items() for k in sd if f"{s}.{k}" not in stored)
        if missing:
            raise ckpt.CorruptCheckpoint(f"{path} lacks {len(missing)} tensors of this run ({', '.join(missing[:3])})")
        dcp.load(path, templates, self.dist)
        state = dict(saved.get("trainer_state") or {})
        state["optimizers"] = {n: templates.pop(f"optim_{n}") for n in self.roles}
        return {"weights": templates, "state": state, "flat_optimizer": True}

    def _read_whole(self, path: Path) -> dict[str, Any]:
        """A one-process (safetensors) checkpoint resumed under torchrun: each rank keeps the rows of its shards of
        the weights, EMAs and AdamW state (in `_read_dcp`'s layout), so a run started on one GPU scales out."""
        templates = self._templates()
        for stem, sd in templates.items():
            whole = {k: of_tensor(v) for k, v in ckpt.load_state_dict(path, stem).items()}
            fill(sd, whole, f"checkpoint file {path / f'{stem}.safetensors'}")
        state = ckpt.load_state(path)
        for n in self.roles:
            named = [(k, p) for k, p in self.roles[n].named_parameters() if p.requires_grad]  # the optimiser's order
            saved = state["optimizers"][n]["state"]
            state["optimizers"][n] = {f"{k}.{s}": shard_like(v, p) if v.dim() else v
                                      for i, (k, p) in enumerate(named) if i in saved for s, v in saved[i].items()}
        return {"weights": templates, "state": state, "flat_optimizer": True}

    def _apply(self, path: Path, saved: dict[str, Any]) -> int:
        w, state = saved["weights"], saved["state"]
        for n, m in self.roles.items():
            ckpt.fit_weights(m, w[n], path / f"{n}.safetensors")
        for n, e in self.ema.items():
            e.load_state_dict(w[f"ema_{n}"])
        for n, m in self.extra.items():
            ckpt.fit_weights(m, w[f"obj_{n}"], path / f"obj_{n}.safetensors")
        for n, o in self.optimizers.items():
            if saved.get("flat_optimizer"):  # `<param>.<state>` tensors (DCP, or resharded)
                dcp.restore_optimizer(self.roles[n], o, state["optimizers"][n])
            else:
                o.load_state_dict(state["optimizers"][n])
        older = sorted(self.ema) if int(state["step"]) > self.cfg.train.ema_start else []  # checkpoints before
        self.ema_live = set(state.get("ema_live", older))  # `ema_live` was saved: their EMA was already running
        self.window = {k: list(v) for k, v in state.get("log_window", {}).items()}
        self.last_good = path
        return int(state["step"])
