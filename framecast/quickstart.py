"""`framecast quickstart`: the main job on a laptop CPU.

Runs the stages of `configs/quickstart.yaml` in order -- the full frame-wise 2-step Causal Forcing++
pipeline: Stage 0 base (the shipped `pretrained:toy-base`, or trained here with `--from-scratch`), Stage 1
AR teacher, Stage 2 causal CD, Stage 3 DMD -- each initialised from the previous checkpoint, resumable
(re-running continues where it stopped) and health-checked when it ends
(eval/health.py). Then it streams a sample from the final model with its KV cache, checks the stream against
the packed teacher-forcing forward, scores every stage with the toy metrics (eval/toy.py) next to real
clips, times streaming, and writes `runs/<name>/report.md` with per-stage sample gifs, loss curves, the
metric table and timings.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch

from .eval import toy as T
from .eval.checks import Recorder, stream_vs_packed
from .generate import load, sample
from .media import grid, write_video
from .models.denoiser import Guidance
from .recipe import run_recipe
from .train import checkpoint as ckpt
from .train.loop import read_log

RECIPE = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"
EVAL_CLIPS = 32  # held-out captions sampled per stage by its health check; the metric table reads those scores
COLUMNS = ("fidelity", "subject_consistency", "dynamic_degree", "motion_smoothness", "instruction_following")


def run(recipe_path: str | Path, overrides: list[str] | tuple[str, ...] = (), *, out_dir: str = "runs",
        eval_clips: int = EVAL_CLIPS) -> Path:
    t_start = time.perf_counter()
    results = run_recipe(recipe_path, overrides, out_dir=out_dir, health_clips=eval_clips)
    t_train = time.perf_counter() - t_start
    root = Path(out_dir) / results[-1].cfg.name
    final = _final_sample(results[-1].ckpt, root)
    scores = _score_stages(results, eval_clips)
    seconds = {"train": t_train, "total": time.perf_counter() - t_start}
    path = _write_report(root, results, final, scores, seconds, eval_clips)
    print(f"quickstart: {seconds['total'] / 60:.1f} min in all; report: {path}")
    return path


def _score_stages(results, clips: int) -> dict[str, dict]:
    """Toy metrics of every stage (from its health check: the same held-out captions and noise for every
    stage), with real clips of those captions as the ceiling."""
    d = results[-1].cfg.data
    real, captions = T.real_clips(clips, d.num_frames, d.height, d.width, seed=d.seed + 1)
    return {"real clips": T.clip_metrics(real, captions), **{r.key: r.health.metrics for r in results}}


@torch.no_grad()
def _final_sample(ckpt_dir: Path, root: Path) -> dict:
    m = load(ckpt_dir)
    spec, cfg = m.spec, m.config
    prompts = cfg.sample.prompts
    cond, null = m.encode_prompts(prompts)
    frames = cfg.sample.num_frames
    rec = Recorder(m.denoiser)
    t0 = time.perf_counter()
    latents = sample(rec, spec, cond, null, num_frames=frames, seed=cfg.sample.seed)
    seconds = time.perf_counter() - t0
    video = m.decode(latents)
    write_video(grid(video), root / "final.gif", fps=cfg.sample.fps)
    write_video(grid(video), root / "final.mp4", fps=cfg.sample.fps)
    check = {}
    if spec.causal:  # the stream's own latents against the packed forward on them
        check = stream_vs_packed(m.denoiser, latents, rec.calls, cond, block_size=spec.block_size, window=spec.window,
                                 sink=spec.sink, guidance=Guidance(spec.guidance, null))
    # first-frame latency of one stream (median of 3 after a warm-up)
    firsts = []
    for _ in range(4):
        t0 = time.perf_counter()
        next(iter(m.stream(prompts[:1], num_frames=frames, seed=0)))
        firsts.append(time.perf_counter() - t0)
    return {"video_seconds": seconds, "frames": frames * len(prompts), "how": spec.describe(), "check": check,
            "prompts": prompts, "first_frame_ms": 1000 * statistics.median(firsts[1:])}


def _last_loss(run_dir: Path) -> str:
    rows = read_log(run_dir)
    for key in ("model/loss", "critic/loss"):
        val = next((r[key] for r in reversed(rows) if key in r), None)
        if val is not None:
            return f"{val:.4f} ({key.split('/')[0]})"
    return "-"


def _write_report(root: Path, results, final: dict, scores: dict, seconds: dict, clips: int) -> Path:
    lines = ["# framecast quickstart report", "",
             f"Total {seconds['total'] / 60:.1f} min ({seconds['train'] / 60:.1f} min of it training and health "
             f"checks), {torch.get_num_threads()} torch threads.", ""]
    lines += ["| stage | steps | wall time | last loss | health |", "|---|---|---|---|---|"]
    for r in results:
        health = r.health.status if r.health is not None else "-"
        if r.cfg.use:  # an existing model stands in for the stage: nothing trained here
            lines.append(f"| {r.key} | {r.cfg.use} (not trained here) | - | - | {health} |")
            continue
        wall = "reused" if r.reused else f"{r.seconds:.0f} s"
        lines.append(f"| {r.key} | {r.cfg.train.steps} | {wall} | {_last_loss(r.cfg.run_dir)} | {health} |")
    lines += ["", f"## Metrics ({clips} held-out captions, same noise for every stage; eval/toy.py)", "",
              "| | " + " | ".join(c.replace("_", " ") for c in COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for name, m in scores.items():
        lines.append(f"| {name} | " + " | ".join(f"{m[c]:.3f}" for c in COLUMNS) + " |")
    lines.append("")
    for r in results:
        rel = r.cfg.run_dir.relative_to(root)
        step = ckpt.read_meta(r.ckpt)["step"]
        lines += [f"## {r.key}", ""]
        lines += [f"`{r.cfg.use}`: {r.ckpt}", ""] if r.cfg.use else \
            [f"![samples]({rel}/samples/step_{step:07d}.gif) ![loss]({rel}/loss.png)", ""]
        if r.health is not None:
            lines += ["```", r.health.summary(), "```", ""]
    lines += ["## Final streamed sample", "", "![final](final.gif)", "",
              f"Prompts: {', '.join(final['prompts'])}.", "",
              f"{final['frames']} frames ({final['how']}, KV-cached streaming) in {final['video_seconds']:.2f} s; "
              f"first frame of a stream after {final['first_frame_ms']:.0f} ms.", ""]
    chk = final["check"]
    if chk:
        ok = chk["max_abs_diff"] < 1e-3 * max(chk["mean_abs_velocity"], 1e-6) + 1e-4
        lines += [f"Streaming vs packed teacher-forcing forward: max |dv| = {chk['max_abs_diff']:.2e} over "
                  f"{chk['calls']} cached calls (mean |v| = {chk['mean_abs_velocity']:.3f}): "
                  f"**{'match' if ok else 'MISMATCH'}**.", ""]
    path = root / "report.md"
    path.write_text("\n".join(lines))
    stages = [{"stage": r.key, "steps": 0 if r.cfg.use else r.cfg.train.steps, "use": r.cfg.use,
               "seconds": r.seconds, "reused": r.reused, "health": r.health.to_json() if r.health else None}
              for r in results]
    (root / "report.json").write_text(json.dumps(
        {"seconds": seconds, "stages": stages, "metrics": scores,
         "final": {k: v for k, v in final.items() if k != "check"}, "check": chk}, indent=1))
    return path
