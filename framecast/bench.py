"""`framecast bench toy`: every method of the toy benchmark trained from one recipe and evaluated alike.

Training is `run_recipe(configs/bench_toy.yaml)`: one seed set, equal budgets, each stage reused when an
identical one already finished (so the toy_* recipes and this benchmark share their stages). Evaluation
samples the same held-out captions with the same noise seed from every checkpoint, scores the clips with
eval/toy.py and the Frechet distance of eval/features.py, times streaming, reads each stage's training cost
from its run, and writes `<out>/<name>/bench/{results.md, results.json, grid.gif}`.

`--smoke` runs the same code with every stage a few steps long, a handful of clips and a briefly trained
encoder, so that the whole path (train, sample, score, time, table, gif) is checked in minutes
(tests/test_bench.py, marker `slow`). Its numbers mean nothing.
"""

from __future__ import annotations

import json
import math
import statistics
import time
import dataclasses
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .eval import features as Fe
from .eval import toy as T
from .generate import LoadedModel, load
from .media import labelled_rows
from .objectives.ode import pair_seconds
from .recipe import run_recipe
from .train.loop import read_log

BENCH_RECIPE = Path(__file__).resolve().parents[1] / "configs" / "bench_toy.yaml"
SUITES = {"toy": BENCH_RECIPE}  # `framecast bench <suite>`
SMOKE = ["name=bench_smoke", "train.steps=3", "train.batch_size=2", "train.sample_every=0", "train.ckpt_every=0",
         "train.log_every=1", "ode.num_pairs=4", "ode.shard_size=2"]


@dataclass(frozen=True)
class Method:
    label: str
    stage: str  # the recipe stage whose checkpoint is sampled ("" = real held-out clips)
    family: str
    init: str = ""  # the Stage-2 stage it was initialised from (its cost column)
    dmd: bool = False  # trained by Stage 3 (its own cost column)
    steps: int | None = None  # Euler steps per block of a multi-step model (few-step models use their own)
    spec_of: str = ""  # sample `stage`'s network with this stage's sampling spec (no training of its own)

    @property
    def key(self) -> str:
        """The row's identity in results.json and COMPARISONS: the stage, or `stage@spec_of`."""
        return f"{self.stage}@{self.spec_of}" if self.spec_of else self.stage


TEACHER_STEPS = 48
METHODS: tuple[Method, ...] = (
    Method("real held-out clips", "", "data"),
    Method(f"Stage 0 bidirectional base, {TEACHER_STEPS} steps, CFG 3", "stage0", "teacher", steps=TEACHER_STEPS),
    Method(f"Stage 1 AR teacher, TF, {TEACHER_STEPS} steps/frame", "stage1", "teacher", steps=TEACHER_STEPS),
    Method(f"Stage 1 AR teacher, DF, {TEACHER_STEPS} steps/frame", "stage1_df", "teacher", steps=TEACHER_STEPS),
    Method("init only: SF bidirectional ODE, 4-step", "ode_sf", "init", init="ode_sf"),
    Method("init only: causal ODE, 4-step", "ode", "init", init="ode"),
    Method("init only: causal CD, 4-step", "cd", "init", init="cd"),
    # what Stage 2 adds: the TF teacher's own network run with CD's 4-step schedule, no distillation
    Method("no Stage 2: the TF teacher, CD's 4-step schedule", "stage1", "init", spec_of="cd"),
    Method("SF: bidirectional ODE + DMD, 1-step", "dmd_sf_1step", "frame-wise", init="ode_sf", dmd=True),
    Method("CF: causal ODE + DMD, 1-step", "dmd_ode_1step", "frame-wise", init="ode", dmd=True),
    Method("CF++: causal CD + DMD, 1-step", "dmd_1step", "frame-wise", init="cd", dmd=True),
    Method("SF: bidirectional ODE + DMD, 2-step", "dmd_sf_2step", "frame-wise", init="ode_sf", dmd=True),
    Method("CF: causal ODE + DMD, 2-step", "dmd_ode_2step", "frame-wise", init="ode", dmd=True),
    Method("CF++: causal CD + DMD, 2-step", "dmd_2step", "frame-wise", init="cd", dmd=True),
    Method("CF++: causal CD + DMD, 4-step", "dmd_4step", "frame-wise", init="cd", dmd=True),
    Method("init only: causal CD with the boundary pair, 4-step", "cd_bnd", "init", init="cd_bnd"),
    Method("CF++ with the boundary pair: CD + DMD, 2-step", "dmd_bnd_2step", "frame-wise", init="cd_bnd", dmd=True),
    Method("CF++ chunk-wise (K=3): CD + DMD, 4-step", "dmd_chunk_4step", "chunk-wise", init="cd_chunk", dmd=True),
    Method("CF++ from the DF teacher, 2-step", "dmd_df_2step", "stage-1 ablation", init="cd_df", dmd=True),
)
METRICS = ("fidelity", "subject_consistency", "dynamic_degree", "motion_smoothness", "instruction_following")
# The papers' orderings (docs/method.md §10) as paired comparisons (a, b, what a - b > 0 would confirm). Every
# method samples the same captions with the same noise, so each clip gives one paired difference, and its
# standard error is that of the per-clip differences (tighter than two independent errors combined).
COMPARISONS: tuple[tuple[str, str, str], ...] = (
    ("dmd_ode_1step", "dmd_sf_1step", "causal ODE init beats the bidirectional-teacher init, 1 step"),
    ("dmd_1step", "dmd_sf_1step", "causal CD init beats the bidirectional-teacher init, 1 step"),
    ("dmd_ode_2step", "dmd_sf_2step", "causal ODE init beats the bidirectional-teacher init, 2 steps"),
    ("dmd_2step", "dmd_sf_2step", "causal CD init beats the bidirectional-teacher init, 2 steps"),
    ("dmd_1step", "dmd_ode_1step", "CD beats ODE after DMD, 1 step"),
    ("dmd_2step", "dmd_ode_2step", "CD beats ODE after DMD, 2 steps"),
    ("dmd_bnd_2step", "dmd_ode_2step", "CD with the boundary pair beats ODE after DMD, 2 steps"),
    ("dmd_bnd_2step", "dmd_2step", "the boundary pair improves CF++, 2 steps"),
    ("cd_bnd", "cd", "the boundary pair improves the CD init (4 steps both)"),
    ("dmd_2step", "dmd_1step", "2 steps beat 1"),
    ("dmd_4step", "dmd_2step", "4 steps beat 2"),
    ("dmd_2step", "dmd_chunk_4step", "frame-wise 2-step beats chunk-wise 4-step"),
    ("dmd_2step", "dmd_df_2step", "the TF teacher's student beats the DF teacher's"),
    ("stage1", "stage1_df", "the TF teacher beats the DF teacher"),
    ("dmd_4step", "cd", "DMD improves on its CD init (4 steps both)"),
    ("cd", "stage1@cd", "CD improves on the undistilled teacher at the same 4 steps"),
)


@torch.no_grad()
def sample_clips(lm: LoadedModel, captions: list[str], num_frames: int, steps: int | None = None) -> torch.Tensor:
    """The benchmark's samples of one model: the captions in batches of 32, noise seed 1000 + the batch's first
    index, so every model (and benchmarks/cd_length.py) draws the same noise for the same caption."""
    return torch.cat([lm.sample(captions[i:i + 32], num_frames=num_frames, seed=1000 + i, steps=steps)
                      for i in range(0, len(captions), 32)])


def stage_seconds(run_dir: Path) -> float:
    """Training wall time of a finished stage (the last logged `time`), plus ODE pair generation if any."""
    rows = read_log(run_dir)
    t = next((r["time"] for r in reversed(rows) if "time" in r), float("nan"))
    if (run_dir / "pairs").is_dir():
        t += pair_seconds(run_dir / "pairs")[0]
    return float(t)


@torch.no_grad()
def timing(m: LoadedModel, caption: str, num_frames: int, steps: int | None, batch: int, repeats: int = 3):
    """(first-frame latency in ms at batch 1, frames per second at `batch`), medians over `repeats` runs
    after one warm-up. A bidirectional model yields its whole clip as one block: no first frame before it.
    Latent frames are timed (the toys' identity codec makes decoding free)."""
    def one(b):
        t0 = time.perf_counter()
        first = None
        for blk in m.stream([caption] * b, num_frames=num_frames, seed=0, steps=steps):
            first = first or time.perf_counter() - t0
        return first, time.perf_counter() - t0

    one(1)
    first = statistics.median(one(1)[0] for _ in range(repeats))
    total = statistics.median(one(batch)[1] for _ in range(repeats))
    return 1000 * first, batch * num_frames / total


def _fmt(v, digits=3):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def write_table(rows: list[dict], path: Path, command: str) -> Path:
    cols = [("method", "method"), ("fidelity", "fidelity ↑"), ("subject_consistency", "consistency ↑"),
            ("dynamic_degree", "dynamic ↑"), ("motion_smoothness", "smoothness ↑"),
            ("instruction_following", "instruction ↑"), ("fd", "FD ↓"), ("steps", "NFE/frame"),
            ("first_frame_ms", "first frame ms ↓"), ("fps", "frames/s ↑"), ("stage2_s", "Stage 2 s"),
            ("stage3_s", "Stage 3 s")]
    lines = [f"Command: `{command}`", "", "| " + " | ".join(c[1] for c in cols) + " |",
             "|" + "---|" * len(cols)]
    for r in rows:
        cells = []
        for key, _ in cols:
            v = r.get(key)
            cell = _fmt(v, 1 if key in ("fd", "first_frame_ms", "fps") else 0 if key.endswith("_s") else 3)
            se = r.get(f"{key}_se")
            cells.append(f"{cell} ±{se:.3f}" if key in METRICS and se is not None and not math.isnan(se) else cell)
        lines.append("| " + " | ".join(cells) + " |")
    path.write_text("\n".join(lines) + "\n")
    return path


def paired_difference(a: list[float], b: list[float]) -> tuple[float, float]:
    """Mean and standard error of the per-clip differences a - b (the same captions and noise in both)."""
    if len(a) != len(b):
        raise ValueError(f"paired clips differ in number: {len(a)} vs {len(b)}")
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    return float(d.mean()), T.standard_error(d)


def paired(a: dict[str, list[float]], b: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    """Per metric of METRICS, from two methods' per-clip scores: the paired difference a - b, its standard error and
    z = diff / se."""
    out = {}
    for k in METRICS:
        diff, se = paired_difference(a[k], b[k])
        out[k] = {"diff": diff, "se": se, "z": diff / se if se > 0 else float("nan")}
    return out


def paired_cell(c: dict[str, float]) -> str:
    """One `paired` entry as a table cell: `diff ±se (z)`."""
    return f"{c['diff']:+.3f} ±{c['se']:.3f} ({c['z']:+.1f})"


def comparisons(rows: list[dict]) -> list[dict]:
    """Every COMPARISONS pair whose two methods were evaluated: per metric the paired difference, its standard
    error and their ratio z (|z| > 3 reads as an ordering that holds beyond sampling noise)."""
    by_key = {r["key"]: r for r in rows if r.get("key")}
    out = []
    for a, b, claim in COMPARISONS:
        if a in by_key and b in by_key:
            out.append({"a": a, "b": b, "claim": claim, **paired(by_key[a]["per_clip"], by_key[b]["per_clip"])})
    return out


def write_comparisons(rows: list[dict], path: Path) -> list[dict]:
    """Append the paired comparisons to the results table (one row per ordering, `diff ±se (z)` per metric)."""
    comps = comparisons(rows)
    lines = ["", "Paired differences a - b over the same clips: mean ±standard error (z = mean / se).", "",
             "| ordering | a | b | " + " | ".join(METRICS) + " |", "|" + "---|" * (3 + len(METRICS))]
    for c in comps:
        cells = [paired_cell(c[k]) for k in METRICS]
        lines.append(f"| {c['claim']} | {c['a']} | {c['b']} | " + " | ".join(cells) + " |")
    with path.open("a") as fh:
        fh.write("\n".join(lines) + "\n")
    return comps


def run(*, out_dir: str = "runs", smoke: bool = False, clips: int | None = None, threads: int | None = None,
        recipe: str | Path = BENCH_RECIPE, overrides: list[str] | tuple[str, ...] = (),
        progress: bool = True) -> Path:
    """Train (or reuse) every stage of the benchmark recipe, evaluate every method, write the table and gif."""
    ov = [*(SMOKE if smoke else []), *(f"train.threads={threads}",) * bool(threads), *overrides]
    results = {r.key: r for r in run_recipe(recipe, ov, out_dir=out_dir)}
    if threads:
        torch.set_num_threads(threads)
    any_cfg = next(iter(results.values())).cfg
    root = Path(out_dir) / any_cfg.name / "bench"
    root.mkdir(parents=True, exist_ok=True)
    d = any_cfg.data
    n = clips or (8 if smoke else 128)
    # held-out captions and clips: the training source draws from seed d.seed, evaluation from other seeds
    real, captions = T.real_clips(n, d.num_frames, d.height, d.width, seed=d.seed + 1)
    reference, _ = T.real_clips(max(2 * n, 16), d.num_frames, d.height, d.width, seed=d.seed + 2)
    encoder, enc_acc = Fe.load_or_train_encoder(Path(out_dir) / "eval_cache", d.num_frames, d.height, d.width,
                                                steps=30 if smoke else 400, progress=progress)
    ref_feats = Fe.features(encoder, reference)
    rows, gif_rows = [], []
    methods = [m for m in METHODS if not m.stage or (m.stage in results and (m.spec_of or m.stage) in results)]
    for m in tqdm(methods, desc="bench: evaluate", disable=not progress):
        row: dict = {"method": m.label, "stage": m.stage, "key": m.key, "family": m.family}
        if not m.stage:
            video = real
            row["steps"] = None
        else:
            lm = load(results[m.stage].ckpt)
            if m.spec_of:
                lm = dataclasses.replace(lm, spec=load(results[m.spec_of].ckpt).spec)
            steps = (4 if smoke else m.steps) if m.steps else None
            video = sample_clips(lm, captions, d.num_frames, steps)
            row["steps"] = lm.spec.replace(steps=steps).nfe if steps else lm.spec.nfe
            row["first_frame_ms"], row["fps"] = timing(lm, captions[0], d.num_frames, steps,
                                                       batch=min(8, n), repeats=1 if smoke else 3)
            row["stage2_s"] = stage_seconds(results[m.init].cfg.run_dir) if m.init else None
            row["stage3_s"] = stage_seconds(results[m.stage].cfg.run_dir) if m.dmd else None
            row["checkpoint"] = results[m.stage].ref  # a shipped name, not this machine's path
        scores = T.clip_scores(video, captions)
        row.update({k: float(v.mean()) for k, v in scores.items()})
        row.update({f"{k}_se": T.standard_error(scores[k]) for k in METRICS})
        row["per_clip"] = {k: scores[k].tolist() for k in METRICS}
        row["fd"] = Fe.frechet_distance(Fe.features(encoder, video), ref_feats)
        rows.append(row)
        gif_rows.append((m.label.replace(": ", ":\n", 1), video[:4]))
    command = "framecast bench toy" + (" --smoke" if smoke else "")
    write_table(rows, root / "results.md", command)
    write_comparisons(rows, root / "results.md")
    (root / "results.json").write_text(json.dumps(
        {"command": command, "clips": n, "encoder_accuracy": enc_acc, "threads": torch.get_num_threads(),
         "methods": [asdict(m) for m in methods], "rows": rows, "comparisons": comparisons(rows)},
        indent=1, default=str))
    labelled_rows(gif_rows, root / "grid.gif", fps=any_cfg.sample.fps)
    print((root / "results.md").read_text())
    print(f"bench: {root}/results.md, results.json, grid.gif")
    return root
