"""What makes two runs of a stage the same run, and whether a run folder may continue (recipe.py uses it).

A run folder that already holds checkpoints continues only under the settings it was trained with: "the
same settings" means the same config without runtime-only keys (threads, progress), how far to train
(train.steps) and where the folder is, comparing the sections every stage reads plus the stage's own
section (stages.Stage.section), so a knob of another method never blocks it. Other settings are refused,
naming the keys, unless `allow_change=True` continues an unfinished run under them on purpose; a folder
holding more steps than train.steps is refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from . import config as C
from . import pretrained
from . import stages as S
from .errors import CheckpointError
from .schema import differing_keys
from .train import checkpoint as ckpt
from .train import distributed

METHOD_SECTIONS = ("few_step", "ode", "cd", "dmd")  # read only by the stages that name them
RUNTIME_KEYS = ("threads", "progress")  # how a run was executed, not what it trained
DIST_RUNTIME_KEYS = ("reshard_after_forward", "shard_group")  # how shards are laid out: the same numbers
LOCATION_KEYS = ("name", "out_dir", "tag")  # where the run folder is, not what it trained
FIXED_KEYS = ("model.", "stage")  # a run resumed under another network or stage kind is refused even if allowed


def identity(cfg: C.RunConfig, world: int = 1) -> dict[str, Any]:
    """What makes two runs of a stage the same run: its config without runtime keys and other methods' knobs.

    The batch is the global one: batch_size x grad_accum x `world` (the ranks of a torchrun job) draws the same
    numbers however it is split (rng.py), so a run resumes at another world size with the same global batch."""
    st = S.get(cfg.stage)
    d = C.to_dict(cfg)
    keep = {st.section} | ({"few_step"} if st.few_step else set())
    d = {k: v for k, v in d.items() if k not in METHOD_SECTIONS or k in keep}
    d["train"] = {k: v for k, v in d["train"].items() if k not in RUNTIME_KEYS + ("batch_size", "grad_accum")}
    d["train"]["global_batch"] = cfg.train.batch_size * cfg.train.grad_accum * world
    d["dist"] = {k: v for k, v in d["dist"].items() if k not in DIST_RUNTIME_KEYS}
    return d


def changed_keys(saved: C.RunConfig, cfg: C.RunConfig, saved_world: int = 1) -> list[str]:
    """The dotted keys whose settings differ between a run's stored config and `cfg`; train.steps (how far to
    train) and the folder's location are not settings of what was trained, except under a cosine learning-rate
    schedule, whose curve train.steps sets (continuing such a run further would jump its learning rate back up)."""
    a, b = identity(saved, saved_world), identity(cfg, distributed.world_size())
    for d in (a, b):
        for k in LOCATION_KEYS:
            d.pop(k, None)
        if d["train"].get("lr_schedule", "constant") == "constant":  # a cosine decay is a function of train.steps
            d["train"].pop("steps", None)
    diff = [k for k in differing_keys(a, b) if not _unpinned_same_name(_at(a, k), _at(b, k))]
    if "train.global_batch" in diff:  # name what the user changed: the per-rank batch, accumulation or world size
        i = diff.index("train.global_batch")
        diff[i:i + 1] = [f"train.{k}" for k in ("batch_size", "grad_accum")
                         if getattr(saved.train, k) != getattr(cfg.train, k)] or \
            [f"the world size ({saved_world} -> {distributed.world_size()} processes)"]
    return diff


def _at(d: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        d = d.get(part) if isinstance(d, dict) else None
    return d


def _unpinned_same_name(a: Any, b: Any) -> bool:
    """A run stored with an unpinned `pretrained:<name>` (before names were pinned, framecast/pretrained) against
    the same name pinned now: the same run as far as can be known, as it was before pinning."""
    return all(isinstance(v, str) and pretrained.is_name(v) for v in (a, b)) and pretrained.same_model(a, b) is None


def stored_run(cfg: C.RunConfig) -> tuple[Path, int, list[str]] | None:
    """(newest checkpoint, its step, `changed_keys` against `cfg`) of `cfg`'s run folder; None for a new run."""
    root = cfg.run_dir / "ckpt"
    last = ckpt.latest(root) if root.is_dir() else None  # scans step_*: the pointer is only a hint
    if last is None:
        return None
    meta = ckpt.read_meta(last)
    try:
        saved = S.normalise(C.from_dict(C.upgrade(meta.get("config", {}))), stored=True)
    except C.ConfigError as e:
        raise CheckpointError(f"{last} holds a config this framecast cannot read ({e})") from None
    step = meta.get("step", 0)
    if step > cfg.train.steps:  # training on would write samples and logs of step train.steps from later weights
        raise CheckpointError(f"{cfg.run_dir} holds a run of {step} steps, more than train.steps="
                              f"{cfg.train.steps}; use another name= or move it away")
    return last, step, changed_keys(saved, S.normalise(cfg), int(meta.get("world_size", 1)))


def _keys(diff: list[str]) -> str:
    return ", ".join(diff[:6]) + (f" and {len(diff) - 6} more" if len(diff) > 6 else "")


def finished(cfg: C.RunConfig, found: tuple[Path, int, list[str]] | None = None) -> Path | None:
    """The final checkpoint of a finished run with these settings; an error if it was made otherwise.
    `found`: `stored_run(cfg)` when the caller has already read it."""
    found = stored_run(cfg) if found is None else found
    if found is None or found[1] != cfg.train.steps:
        return None  # new or unfinished: train_stage checks what it resumes (check_resume)
    last, _, diff = found
    if diff:
        raise CheckpointError(f"{cfg.run_dir} already holds a finished run with other settings ({_keys(diff)}); "
                              f"use another name= or move it away")
    return last


def check_resume(cfg: C.RunConfig, *, allow_change: bool = False) -> None:
    """Refuse to continue a run under settings other than those it was trained with (a mixed run).

    `allow_change`: continue an unfinished run under changed settings on purpose (a lower train.lr, say);
    its model and stage kind can never change, and a finished run has nothing left to continue."""
    found = stored_run(cfg)  # the run folder is read once
    if found is None or finished(cfg, found) is not None:
        return  # a new run, or finished with these settings: the trainer has nothing to do
    last, step, diff = found
    fixed = [k for k in diff if k.startswith(FIXED_KEYS)]
    if fixed:
        raise CheckpointError(f"{last} was trained with a different model config or stage ({_keys(fixed)}); use "
                              f"another run name (name=...) instead of resuming it")
    if diff and not allow_change:
        raise CheckpointError(f"{cfg.run_dir} holds a run trained {step} steps with other settings ({_keys(diff)}); "
                              f"resuming it would mix them: use another name=, or allow the change on purpose "
                              f"(--allow-config-change; allow_change=True)")
    if diff:
        print(f"== {cfg.run_dir}: resuming at step {step} with changed settings: {_keys(diff)}", flush=True)
