"""Stage health check: after each stage, does it look like it worked?

Users of the official code cannot tell a failed stage from a working one until they look at videos by
hand. Here every finished stage gets a verdict, printed and written to `<run>/health.json`:

- **losses** (every stage, by the stage's `LossRule` in the registry, stages.py): all logged losses finite;
  for the regression stages (stage0, stage1, ode: rule `no_rise`) the mean of the last fifth of the log is
  not above the first fifth (x 1.10 slack); a stage trained from scratch with `halve_from_scratch` (stage0)
  must at least halve its loss. Causal CD's loss compares the student with its own moving target network on
  adjacent grid points (method.md §6; Song et al. 2023, consistency models): started from the teacher it begins
  near the teacher's own step-to-step inconsistency and has no downward trend to expect, so its rule `stable`
  checks only for blow-up (last fifth <= 3 x first fifth); its samples are checked below. DMD's generator loss
  is a normalised gradient surrogate with no trend to expect, so its rule `critic_stable` checks only the
  critic loss for blow-up (last fifth <= 3 x first fifth).
- **samples** (shapes toy): clips for held-out captions sampled as the checkpoint samples, scored with
  eval/toy.py against bounds set by this module's corruption baselines (tests/test_health.py): the noise
  baseline has fidelity ~0.04, a frozen clip has dynamic degree 0, a blank or washed-out clip holds no
  object. FAIL when the output is noise-like, blank/washed out, or static; WARN when a distilled stage lost
  more than a quarter (and at least 0.15) of its init's fidelity or dynamic degree (a regression, not
  necessarily a failure; the absolute floor keeps sampling noise of a few dozen clips from raising it).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .. import pretrained
from ..generate import load
from ..train.loop import read_log
from . import toy as T

FAIL, WARN, OK = "FAIL", "WARN", "OK"
BOUNDS = {"fidelity": 0.2, "recognised": 0.5, "dynamic_degree": 0.1}  # FAIL below; see the module docstring
REGRESSION = 0.25  # WARN when a distilled stage keeps less than 75% of its init's fidelity or dynamic degree
REGRESSION_ABS = 0.15  # ... and lost at least this much: 16-32 clips give a dynamic degree +-0.08-0.11 (1 s.e.)


@dataclass(frozen=True)
class LossRule:
    """What a stage's loss log must show (each registry record carries one)."""

    # no_rise: regression losses must not rise | stable: no loss may blow up | critic_stable: only critic/* checked
    kind: str = "no_rise"
    halve_from_scratch: bool = False  # trained from scratch (no init=), the loss must at least halve

    def __post_init__(self) -> None:
        if self.kind not in ("no_rise", "stable", "critic_stable"):
            raise ValueError(f"unknown loss rule {self.kind!r}; choose no_rise, stable or critic_stable")


@dataclass
class Check:
    name: str
    status: str
    detail: str


@dataclass
class Health:
    stage: str
    checks: list[Check] = field(default_factory=list)
    metrics: dict = field(default_factory=dict)

    @property
    def status(self) -> str:
        got = {c.status for c in self.checks}
        return FAIL if FAIL in got else WARN if WARN in got else OK

    def summary(self) -> str:
        lines = [f"health {self.stage}: {self.status}"]
        lines += [f"  [{c.status}] {c.name}: {c.detail}" for c in self.checks]
        return "\n".join(lines)

    checkpoint: str = ""

    def to_json(self) -> dict:
        return {"stage": self.stage, "status": self.status, "checkpoint": self.checkpoint,
                "checks": [asdict(c) for c in self.checks], "metrics": self.metrics}

    @classmethod
    def from_json(cls, d: dict) -> Health:
        return cls(d["stage"], [Check(**c) for c in d["checks"]], d.get("metrics", {}), d.get("checkpoint", ""))


def _fifths(values: list[float]) -> tuple[float, float]:
    k = max(1, len(values) // 5)
    return sum(values[:k]) / k, sum(values[-k:]) / k


def loss_checks(rows: list[dict], rule: LossRule, from_scratch: bool) -> list[Check]:
    keys = sorted({k for r in rows for k in r if k.endswith("loss")})
    if not keys:
        return [Check("losses", FAIL, "no loss was logged")]
    out = []
    for key in keys:
        vals = [float(r[key]) for r in rows if key in r]
        if not all(math.isfinite(v) for v in vals):
            out.append(Check(key, FAIL, "non-finite loss logged"))
            continue
        first, last = _fifths(vals)
        trend = f"{first:.4g} -> {last:.4g} (first/last fifth of {len(vals)} rows)"
        if rule.kind in ("stable", "critic_stable"):  # only a blow-up fails (of the critic alone for DMD)
            why = "critic" if rule.kind == "critic_stable" else "a moving self-target:"
            if rule.kind == "stable" or key.startswith("critic"):
                out.append(Check(key, FAIL if last > 3 * first else OK, f"{trend}; {why} must not blow up"))
            continue
        if from_scratch and rule.halve_from_scratch:
            # against the untrained network's loss (the first twentieth of the rows), not the first fifth's: a
            # run that learns within its first fifth and then sits at its data's floor (Breakout's mostly still
            # screen, docs/world_model.md) has learnt, and a flat log still fails
            start = sum(vals[:(k := max(1, len(vals) // 20))]) / k
            out.append(Check(key, OK if last <= 0.5 * start else FAIL,
                             f"{trend}; from scratch it must halve from the first twentieth's {start:.4g}"))
        else:
            out.append(Check(key, OK if last <= 1.10 * first else FAIL, trend + "; must not rise"))
    return out


def sample_checks(metrics: dict, init_metrics: dict | None) -> list[Check]:
    m = metrics
    out = [
        Check("not noise", FAIL if m["fidelity"] < BOUNDS["fidelity"] else OK,
              f"fidelity {m['fidelity']:.3f} (noise ~0.04, real 1.0; FAIL below {BOUNDS['fidelity']})"),
        Check("objects present", FAIL if m["recognised"] < BOUNDS["recognised"] else OK,
              f"{m['recognised']:.0%} of frames hold a sprite-like object (blank or washed-out frames do not; "
              f"FAIL below {BOUNDS['recognised']:.0%})"),
        Check("moves", FAIL if m["dynamic_degree"] < BOUNDS["dynamic_degree"] else OK,
              f"dynamic degree {m['dynamic_degree']:.3f} (frozen 0, real 1; FAIL below {BOUNDS['dynamic_degree']})"),
    ]
    if init_metrics:
        for key in ("fidelity", "dynamic_degree"):
            was, now = init_metrics[key], m[key]
            bad = now < (1 - REGRESSION) * was and was - now >= REGRESSION_ABS
            out.append(Check(f"{key} vs init", WARN if bad else OK, f"{was:.3f} -> {now:.3f}"))
    return out


@torch.no_grad()
def sample_metrics(ckpt_dir: str | Path, clips: int = 16, seed: int = 0) -> dict:
    """Toy metrics of `clips` samples for held-out captions (the data seed + 1), sampled as the checkpoint says."""
    m = load(ckpt_dir)
    d = m.config.data
    _, captions = T.real_clips(clips, d.num_frames, d.height, d.width, seed=d.seed + 1)
    return T.clip_metrics(m.sample(captions, num_frames=d.num_frames, seed=seed), captions)


def check_stage(run_dir: str | Path, ckpt_dir: str | Path, rule: LossRule, *, init: str = "",
                compare_init: bool = False, data: str = "shapes", clips: int = 16, losses: bool = True) -> Health:
    """Health of a finished stage; writes `<run_dir>/health.json` and returns it.

    `compare_init`: a distilled stage is also compared with its init's health (a regression is a WARN).
    `losses=False`: a stage that is an existing model (recipe `use:`) has no loss log of its own to check."""
    run_dir = Path(run_dir)
    checks = loss_checks(read_log(run_dir), rule, from_scratch=not init) if losses else []
    h = Health(run_dir.name, checks, checkpoint=str(ckpt_dir))
    if data == "shapes":
        h.metrics = sample_metrics(ckpt_dir, clips)
        init_metrics = None
        if init and compare_init and not pretrained.is_name(init):  # a shipped init has no run folder
            init_run = Path(init).parents[1]  # <run>/ckpt/step_N -> <run>
            prev = init_run / "health.json"
            init_metrics = json.loads(prev.read_text())["metrics"] if prev.exists() else None
        h.checks += sample_checks(h.metrics, init_metrics)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "health.json").write_text(json.dumps(h.to_json(), indent=1))
    return h
