"""Sample several checkpoints with the same prompts and noise; one row per checkpoint in one gif, plus timings.

    python scripts/compare_stages.py runs/toy/stage1 runs/toy/cd runs/toy/dmd_2step --out docs/img/toy_stages

Each checkpoint samples the way its sampling spec says (Euler with CFG for Stage 0/1, the few-step schedule without
CFG for distilled generators), streamed with its KV cache. Prints a markdown table of per-checkpoint
sampler, forwards per frame, first-block latency and throughput (batch = number of prompts, this machine).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from framecast.generate import load
from framecast.media import grid, write_video
from framecast.spec import SamplingSpec

PROMPTS = ["a red circle moving right slow", "a green square moving down fast", "a blue triangle moving left fast",
           "a yellow square moving up slow"]


def describe(spec: SamplingSpec) -> str:
    if spec.few_step:
        first = f" (first block {len(spec.first_sigmas)})" if spec.first_sigmas else ""
        return f"few-step {len(spec.sigmas)}{first}, no CFG"
    return f"Euler {spec.steps}, CFG {spec.guidance:g}" + ("" if spec.causal else ", bidirectional")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("ckpts", nargs="+")
    p.add_argument("--prompt", action="append", default=None)
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="compare")
    p.add_argument("--threads", type=int, default=0)
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    prompts = a.prompt or PROMPTS
    rows, table = [], []
    for path in a.ckpts:
        m = load(path)
        m.sample_latents(prompts, num_frames=1, seed=a.seed)  # warm-up (first-call allocation)
        t0 = time.perf_counter()
        m.sample_latents(prompts, num_frames=m.spec.block(a.frames), seed=a.seed)
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        video = m.sample(prompts, num_frames=a.frames, seed=a.seed)  # [N, F, 3, H, W], decoded
        total = time.perf_counter() - t0
        rows.append(video)
        table.append({"checkpoint": str(path), "stage": m.config.stage, "sampler": describe(m.spec),
                      "block": m.spec.block(a.frames), "first_block_ms": first * 1e3,
                      "frames_per_s": len(prompts) * a.frames / total})
    stacked = torch.cat([grid(v, ncol=len(prompts))[None] for v in rows])  # [R, F, 3, H', W']
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_video(grid(stacked, ncol=1), out.with_suffix(".gif"), fps=6, scale=2)
    out.with_suffix(".json").write_text(json.dumps(table, indent=2))
    print(f"rows (top to bottom) -> {out.with_suffix('.gif')}; prompts (left to right): {', '.join(prompts)}")
    print("| row | checkpoint | sampler | block | first block (ms, batch %d) | frames/s |" % len(prompts))
    print("|---|---|---|---|---|---|")
    for i, r in enumerate(table):
        print(f"| {i + 1} | `{r['checkpoint']}` | {r['sampler']} | {r['block']} | {r['first_block_ms']:.0f} | "
              f"{r['frames_per_s']:.1f} |")


if __name__ == "__main__":
    main()
