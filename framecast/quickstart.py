"""`framecast quickstart`: the main job on a laptop CPU.

Runs the stages of `configs/quickstart.yaml` in order (each initialised from the previous checkpoint and
resumable: re-running continues where it stopped), then streams a sample from the final frame-wise AR
model with its KV cache, checks the stream against the packed teacher-forcing forward, and writes
`runs/<name>/report.md` with per-stage samples, loss curves, timings and the check.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from .eval.checks import Recorder, stream_vs_packed
from .media import grid, write_video
from .models.conditioning import Cond, build_text_encoder
from .models.denoiser import Guidance
from .pipeline import load_model, run_recipe, sample
from .train import checkpoint as ckpt


def run(recipe_path: str | Path, overrides: list[str] | tuple[str, ...] = (), *, out_dir: str = "runs") -> Path:
    results = run_recipe(recipe_path, overrides, out_dir=out_dir)
    root = Path(out_dir) / results[-1].cfg.name
    stages = [{"stage": r.key, "ckpt": r.ckpt, "seconds": r.seconds, "cfg": r.cfg} for r in results]
    report = _final_sample(results[-1].ckpt, root)
    path = _write_report(root, stages, report)
    print(f"report: {path}")
    return path


@torch.no_grad()
def _final_sample(ckpt_dir: Path, root: Path) -> dict:
    model, meta, cfg = load_model(ckpt_dir)
    sm = meta["sampling"]
    enc = build_text_encoder(sm["text_encoder"], cfg.model.text_dim, sm["text_tokens"], cfg.data.seed)
    prompts = cfg.sample.prompts
    cond, null = Cond(enc.encode(prompts)), Cond(enc.encode([""] * len(prompts)))
    frames = cfg.sample.num_frames
    rec = Recorder(model)
    t0 = time.perf_counter()
    video = sample(rec, sm, cond, null, num_frames=frames, seed=cfg.sample.seed)
    seconds = time.perf_counter() - t0
    write_video(grid(video), root / "final.gif", fps=cfg.sample.fps)
    write_video(grid(video), root / "final.mp4", fps=cfg.sample.fps)
    check = {}
    if sm["causal"]:
        check = stream_vs_packed(model, video, rec.calls, cond, block_size=sm["block_size"], window=sm["window"],
                                 sink=sm["sink"], guidance=Guidance(sm["guidance"], null))
    how = (f"{sm['steps']}-step few-step sampler, no CFG" if sm.get("few_step")
           else f"{sm['steps']} Euler steps per frame with CFG {sm['guidance']:g}")
    return {"video_seconds": seconds, "frames": frames * len(prompts), "how": how, "check": check,
            "prompts": prompts}


def _write_report(root: Path, stages: list[dict], final: dict) -> Path:
    lines = ["# framecast quickstart report", ""]
    lines += ["| stage | steps | wall time | last loss | checkpoint |", "|---|---|---|---|---|"]
    for s in stages:
        run_dir = s["cfg"].run_dir
        rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
        loss = next((r["model/loss"] for r in reversed(rows) if "model/loss" in r), float("nan"))
        lines.append(f"| {s['stage']} | {s['cfg'].train.steps} | {s['seconds']:.0f} s | {loss:.4f} | "
                     f"`{s['ckpt']}` |")
    lines.append("")
    for s in stages:
        rel = s["cfg"].run_dir.relative_to(root)
        step = ckpt.read_meta(s["ckpt"])["step"]
        lines += [f"## {s['stage']}", "", f"![samples]({rel}/samples/step_{step:07d}.gif) "
                  f"![loss]({rel}/loss.png)", ""]
    lines += ["## Final streamed sample", "", "![final](final.gif)", "",
              f"Prompts: {', '.join(final['prompts'])}.", "",
              f"{final['frames']} frames ({final['how']}, KV-cached streaming) in "
              f"{final['video_seconds']:.1f} s.", ""]
    chk = final["check"]
    if chk:
        ok = chk["max_abs_diff"] < 1e-3 * max(chk["mean_abs_velocity"], 1e-6) + 1e-4
        lines += [f"Streaming vs packed teacher-forcing forward: max |dv| = {chk['max_abs_diff']:.2e} over "
                  f"{chk['calls']} cached calls (mean |v| = {chk['mean_abs_velocity']:.3f}): "
                  f"**{'match' if ok else 'MISMATCH'}**.", ""]
    path = root / "report.md"
    path.write_text("\n".join(lines))
    return path
