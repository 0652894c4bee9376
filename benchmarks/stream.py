"""Streaming benchmark: KV-cached frame-wise streaming vs recomputing the prefix (issue: core engine).

    python benchmarks/stream.py                       # toy preset, 64 frames, window 8, 4 steps per frame
    python benchmarks/stream.py --frames 96 --window 16 --profile

Cached: `rollout` with a rolling KV cache (window W frames). Each frame costs `steps` denoising forwards
of T tokens against at most W*T cached keys, plus one commit forward.
Recompute: no cache; every denoising step of frame f runs one forward over frames 0..f under the
block-causal plan (generated frames clean at sigma 0, frame f noisy), which is what a cache-less AR model
does and gives the same prediction for the last frame (checked and printed).

Prints ms per frame over time, first-frame latency, the cached/recompute ratio, and the model's matmul
FLOP/s as a fraction of this machine's fp32 matmul peak measured in the same run. Weights are random:
speed does not depend on them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from framecast import config as C
from framecast import flow
from framecast.models.attention import AttentionPlan
from framecast.models.conditioning import Cond
from framecast.models.transformer import forward_flops
from framecast.generate import build_denoiser
from framecast.rollout import rollout
from framecast.sampling import euler


def matmul_peak(n: int = 1024, reps: int = 20) -> float:
    """Best-of fp32 GEMM FLOP/s for an n x n x n product (the machine's practical peak)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def cached_stream(model, cond, noise, sigmas, window):
    times = []
    t0 = time.perf_counter()
    for blk in rollout(model, noise, cond, sampler=euler, sigmas=sigmas, block_size=1, window=window):
        t1 = time.perf_counter()
        times.append(t1 - t0)
        t0 = t1
    return times


@torch.no_grad()
def recompute_stream(model, cond, noise, sigmas, check_every=16):
    """Frame f: each step runs frames 0..f without a cache (block-causal plan, context clean at sigma 0)."""
    B, F = noise.shape[:2]
    plan = AttentionPlan("block_causal", 1)
    video = noise.new_zeros(noise.shape)
    times, diffs = [], []
    for f in range(F):
        t0 = time.perf_counter()
        x = noise[:, f:f + 1]
        for i in range(len(sigmas) - 1):
            seq = torch.cat([video[:, :f], x], dim=1)
            sig = torch.zeros(B, f + 1)
            sig[:, f] = sigmas[i]
            v = model.velocity(seq, sig, cond, plan=plan)[:, f:f + 1]
            x = flow.euler_step(x, v, sig[:, f:f + 1], torch.full((B, 1), float(sigmas[i + 1])))
        video[:, f:f + 1] = x
        times.append(time.perf_counter() - t0)
    return times, video, diffs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="toy")
    p.add_argument("--frames", type=int, default=64)
    p.add_argument("--window", type=int, default=8)
    p.add_argument("--steps", type=int, default=4, help="Euler steps per frame")
    p.add_argument("--size", type=int, default=32, help="frame height = width (pixels, identity codec)")
    p.add_argument("--text-tokens", type=int, default=16)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--no-fuse", dest="fuse", action="store_false", help="keep q, k, v as three matmuls")
    p.add_argument("--profile", action="store_true", help="print the top ops of one cached frame")
    p.add_argument("--json", type=Path, default=None, help="also write the figures as JSON")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    mc = C.model_preset(args.preset)
    model = build_denoiser(mc).eval()
    n_params = sum(p.numel() for p in model.parameters())
    if args.fuse:
        model.net.fuse_qkv_projections()  # inference only: q/k/v as one matmul (diffusers' fused layout)
    cond = Cond(torch.randn(1, args.text_tokens, mc.text_dim))
    noise = torch.randn(1, args.frames, mc.in_channels, args.size, args.size)
    sigmas = flow.grid(args.steps, 5.0).float()
    T = (args.size // mc.patch_size[1]) * (args.size // mc.patch_size[2])

    peak = matmul_peak()
    with torch.no_grad():
        cached_stream(model, cond, noise[:, :4], sigmas, args.window)  # warm-up
        cached = cached_stream(model, cond, noise, sigmas, args.window)
        # the same stream without a window, for the recompute equality check
        full = torch.cat([b.x0 for b in rollout(model, noise, cond, sampler=euler, sigmas=sigmas, block_size=1)], 1)
    recompute, video, _ = recompute_stream(model, cond, noise, sigmas)
    max_diff = float((video - full).abs().max())

    # FLOPs of the cached stream: per frame `steps` denoising forwards + 1 commit, keys <= window
    flops = 0.0
    for f in range(args.frames):
        ctx = min(f, args.window - 1) if args.window else f
        flops += (args.steps + 1) * forward_flops(mc, T, (ctx + 1) * T, args.text_tokens, text_kv=f == 0)
    achieved = flops / sum(cached)

    def ms(ts, f):
        lo, hi = max(0, f - 2), min(len(ts), f + 3)  # median of 5 around frame f: this VM jitters
        return 1000 * statistics.median(ts[lo:hi])

    marks = [m for m in (1, 8, 16, 32, 48, 64, 96, 128) if m <= args.frames]
    print(f"preset {args.preset}: {n_params / 1e6:.2f}M params, {T} tokens/frame, "
          f"{args.steps} Euler steps/frame, window {args.window}, batch 1, {torch.get_num_threads()} threads, "
          f"fused qkv {args.fuse}")
    print(f"{'frame':>6} {'cached ms':>10} {'recompute ms':>13} {'speed-up':>9}")
    for m in marks:
        c, r = ms(cached, m - 1), ms(recompute, m - 1)
        print(f"{m:>6} {c:>10.1f} {r:>13.1f} {r / c:>8.1f}x")
    c8, c_last = ms(cached, 7), ms(cached, args.frames - 1)
    figures = {
        "first_frame_latency_ms": 1000 * cached[0],
        "cached_ms_frame8": c8, "cached_ms_last": c_last, "cached_last_over_8": c_last / c8,
        "recompute_ms_last": ms(recompute, args.frames - 1),
        "speedup_last": ms(recompute, args.frames - 1) / c_last,
        "cached_fps": args.frames / sum(cached), "recompute_fps": args.frames / sum(recompute),
        "model_gflops": achieved / 1e9, "peak_gflops": peak / 1e9, "fraction_of_peak": achieved / peak,
        "recompute_vs_cache_max_abs_diff": max_diff,
    }
    print(f"first-frame latency {figures['first_frame_latency_ms']:.1f} ms; cached frame {args.frames} / frame 8 = "
          f"{figures['cached_last_over_8']:.2f}x; cached is {figures['speedup_last']:.1f}x faster than recompute "
          f"at frame {args.frames}")
    print(f"throughput: cached {figures['cached_fps']:.1f} frames/s, recompute {figures['recompute_fps']:.1f} frames/s")
    print(f"model matmul FLOP/s {achieved / 1e9:.2f} G vs fp32 GEMM peak {peak / 1e9:.1f} G measured now: "
          f"{100 * achieved / peak:.1f}% of peak")
    print(f"recompute (no cache) vs cached stream, same frames: max |diff| {max_diff:.2e}")
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
            cached_stream(model, cond, noise[:, :8], sigmas, args.window)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
