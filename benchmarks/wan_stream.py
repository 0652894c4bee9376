"""Wan2.1-scale streaming benchmark: KVCache vs StaticKVCache (and torch.compile), few-step students.

    python benchmarks/wan_stream.py --out wan_stream.json            # GPU: wan2.1-1.3b, bf16, 480x832 pixels
    python benchmarks/wan_stream.py --device cpu                      # CPU: tiny preset, 128x192 pixels
    python benchmarks/wan_stream.py --compile --compile-mode reduce-overhead   # + a compiled static row

The model is the real architecture of `--preset` (default wan2.1-1.3b on CUDA, tiny on CPU) with random
weights: speed does not depend on them. Latent frames are H/s x W/s for a pixel size and the VAE's spatial
factor s, and tokens per frame (H/s/ph)(W/s/pw) follow from the patch size (architecture.md §3): 480x832
pixels -> 60x104 latents -> 1560 tokens with s = 8 and the Wan patch 2.

For each student -- frame-wise 1-step and 2-step (the first frame with 4 steps, method.md §7.6) and
chunk-wise 4-step (K = 3) -- and each cache, a stream of `--frames` latent frames runs block by block as
`stream.Session.step` does (one `rollout` per block, the cache passed in) after a warm-up stream that fills the
window. Reported: latent frames/s; video frames/s without decode (the VAE's 1 + 4 (F - 1) pixel frames) and
with it (`framecast.models.wan_vae.WanVAECodec(AutoencoderKLWan)`, random weights: Wan2.1-shaped on CUDA, a
tiny one on CPU; skipped with a note when the module is absent or fails); first-block latency; peak memory
(CUDA max_memory_allocated, CPU peak RSS of the timed stream); and model FLOP/s (`forward_flops` at each forward's
actual context length, attention included) as a fraction of the GEMM peak measured in the same run (bf16 on
CUDA, fp32 on CPU; the best of a GEMM before the rows and one after each row, whose own figure shows how
quiet the machine was). `max_abs_diff_vs_kv` compares each row's latents with the KVCache row's (the first row).
The decoded figure adds a serial streaming decode of the same latents (measured once per student) to the
generation time. CPU figures move with whatever else runs on the machine: the JSON records the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from framecast import config as C
from framecast import flow
from framecast.generate import build_denoiser
from framecast.models.conditioning import Cond
from framecast.models.denoiser import Denoiser
from framecast.models.transformer import forward_flops
from framecast.rollout import rollout
from framecast.sampling import few_step

FIRST_4 = [1000, 750, 500, 250]


@dataclass(frozen=True)
class Student:
    name: str
    block_size: int
    steps: tuple[int, ...]  # the configs' warped step lists (method.md §12.3)
    first_steps: tuple[int, ...] | None


STUDENTS = [Student("framewise_1step", 1, (1000,), tuple(FIRST_4)),
            Student("framewise_2step", 1, (1000, 500), tuple(FIRST_4)),
            Student("chunkwise_4step", 3, tuple(FIRST_4), None)]
CACHES = ("kv", "static", "static_ring")  # run in this order: every row's latents are compared with the first's


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="auto (cuda if available) | cpu | cuda")
    p.add_argument("--preset", default=None, help="model preset; default wan2.1-1.3b on CUDA, tiny on CPU")
    p.add_argument("--dtype", default=None, help="bfloat16 | float32; default bf16 on CUDA, fp32 on CPU")
    p.add_argument("--height", type=int, default=None, help="pixel height; default 480 on CUDA, 128 on CPU")
    p.add_argument("--width", type=int, default=None, help="pixel width; default 832 on CUDA, 192 on CPU")
    p.add_argument("--spatial", type=int, default=8, help="VAE spatial factor (pixels per latent)")
    p.add_argument("--temporal", type=int, default=4, help="VAE temporal factor (pixel frames per latent frame)")
    p.add_argument("--patch", type=int, default=None, help="patch size ph = pw; default the preset's")
    p.add_argument("--latent-channels", type=int, default=16, help="the Wan VAE's z_dim")
    p.add_argument("--frames", type=int, default=None, help="latent frames per stream; default 30 CUDA, 12 CPU")
    p.add_argument("--window", type=int, default=None, help="latent frames incl. the block; default 9 / 6")
    p.add_argument("--sink", type=int, default=1)
    p.add_argument("--text-tokens", type=int, default=None, help="default 512 (UMT5) on CUDA, 16 on CPU")
    p.add_argument("--students", default=",".join(s.name for s in STUDENTS))
    p.add_argument("--caches", default=",".join(CACHES))
    p.add_argument("--compile", action="store_true", help="add a static_compiled row (torch.compile)")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode (reduce-overhead: CUDA graphs)")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend (eager: tests)")
    p.add_argument("--vae", default="auto", help="auto (wan2.1 on CUDA, tiny on CPU) | wan2.1 | tiny | none")
    p.add_argument("--peak-n", type=int, default=None, help="GEMM size for the peak; default 8192 CUDA, 1024 CPU")
    p.add_argument("--no-fuse", dest="fuse", action="store_false", help="keep q, k, v as three matmuls")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="write the figures as JSON")
    args = p.parse_args(argv)
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    args.device = torch.device("cuda" if cuda else "cpu")
    for name, gpu, cpu in [("preset", "wan2.1-1.3b", "tiny"), ("dtype", "bfloat16", "float32"),
                           ("height", 480, 128), ("width", 832, 192), ("frames", 30, 12), ("window", 9, 6),
                           ("text_tokens", 512, 16), ("peak_n", 8192, 1024), ("vae", "wan2.1", "tiny")]:
        if getattr(args, name) in (None, "auto"):
            setattr(args, name, gpu if cuda else cpu)
    args.dtype = getattr(torch, args.dtype)
    return args


def sync_for(dev: torch.device):
    return torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)


def matmul_peak(dev: torch.device, dtype: torch.dtype, n: int, reps: int = 10) -> float:
    """Best-of GEMM FLOP/s for an n x n x n product (the practical peak of this machine, now)."""
    sync = sync_for(dev)
    a, b = torch.randn(n, n, device=dev, dtype=dtype), torch.randn(n, n, device=dev, dtype=dtype)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def reset_peak(dev: torch.device) -> str:
    """Start a peak-memory window; returns what `peak_mib` will measure."""
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        return "cuda max_memory_allocated"
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: resets VmHWM, the peak RSS, to the current RSS
        return "peak RSS (VmHWM, reset per row)"
    except OSError:
        return "process peak RSS (ru_maxrss, not resettable here)"


def peak_mib(dev: torch.device) -> float:
    if dev.type == "cuda":
        return torch.cuda.max_memory_allocated(dev) / 2**20
    try:
        hwm = [ln for ln in Path("/proc/self/status").read_text().splitlines() if ln.startswith("VmHWM:")]
        return int(hwm[0].split()[1]) / 1024  # kB
    except (OSError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def build_vae(args):
    """(codec or None, note): WanVAECodec over a random-weight AutoencoderKLWan, when the module exists."""
    if args.vae == "none":
        return None, "VAE columns skipped: --vae none"
    try:
        from framecast.models import wan_vae
    except ImportError as e:
        return None, f"VAE columns skipped: framecast.models.wan_vae is not available ({e})"
    from diffusers import AutoencoderKLWan

    cfg = dict(getattr(wan_vae, "WAN21_VAE_CONFIG", {}))  # diffusers' defaults are the Wan2.1 VAE too
    if args.vae == "tiny":
        cfg |= dict(base_dim=8, dim_mult=[1, 1, 1, 1], num_res_blocks=1)  # the same strides, 1/12 the width
    try:
        vae = AutoencoderKLWan(**cfg).to(args.device).eval()
        if args.dtype != torch.float32:
            vae = vae.to(args.dtype)
        codec = wan_vae.WanVAECodec(vae)
        if codec.latent_channels != args.latent_channels or codec.spatial != args.spatial:
            return None, (f"VAE columns skipped: the VAE has {codec.latent_channels} channels and spatial factor "
                          f"{codec.spatial}, the stream {args.latent_channels} and {args.spatial}")
        return codec, f"{args.vae} AutoencoderKLWan ({sum(p.numel() for p in vae.parameters()) / 1e6:.1f}M), random"
    except Exception as e:  # noqa: BLE001 - recorded in the JSON; the rest of the benchmark still runs
        return None, f"VAE columns skipped: WanVAECodec(AutoencoderKLWan) failed ({type(e).__name__}: {e})"[:500]


@torch.no_grad()
def decode_seconds(codec, latents: torch.Tensor, K: int, sync) -> float:
    """Streaming decode of [B, F, C, h, w] latents block by block, after one warm-up block."""
    codec.decoder().step(latents[:, :K])
    dec = codec.decoder()
    sync()
    t0 = time.perf_counter()
    for s in range(0, latents.shape[1], K):
        dec.step(latents[:, s:s + K])
    sync()
    return time.perf_counter() - t0


@torch.no_grad()
def stream(model, compiled, cache, noise, cond, st: Student, sync) -> tuple[list[float], list[int], torch.Tensor]:
    """One stream, block by block as Session.step; the compiled model only once the window is full (the
    filling blocks have growing shapes). Returns per-block seconds, context frames per block, latents."""
    F, K = noise.shape[1], st.block_size
    sigmas = flow.few_step_sigmas(list(st.steps), 5.0).float()
    first = flow.few_step_sigmas(list(st.first_steps), 5.0).float() if st.first_steps else None
    g = torch.Generator().manual_seed(0)
    times, ctx, outs = [], [], []
    for s in range(0, F, K):
        x = noise[:, s:s + K].contiguous()  # [B, K, C, h, w]
        full = getattr(cache, "capacity", -1) == cache.num_frames
        ctx.append(cache.num_frames)
        sync()
        t0 = time.perf_counter()
        (blk,) = rollout(compiled if compiled is not None and full else model, x, cond, sampler=few_step,
                         sigmas=sigmas, first_sigmas=first if s == 0 else None, block_size=K, cache=cache,
                         commit_last=True, generator=g)
        sync()
        times.append(time.perf_counter() - t0)
        outs.append(blk.x0)
    return times, ctx, torch.cat(outs, 1)


def stream_flops(mc: C.ModelConfig, st: Student, ctx: list[int], F: int, T: int, text_tokens: int) -> float:
    """Matmul FLOPs of a stream: per block (steps + 1 commit) forwards of its n*T queries against (c + n)*T
    keys; only the stream's first forward computes the text K/V (the per-prompt cache, method.md §3.4)."""
    total, K = 0.0, st.block_size
    for b, c in enumerate(ctx):
        n = min(K, F - b * K)
        steps = len(st.first_steps) if b == 0 and st.first_steps else len(st.steps)
        for i in range(steps + 1):
            total += forward_flops(mc, n * T, (c + n) * T, text_tokens, text_kv=b == 0 and i == 0)
    return total


def run_row(args, mc, model, compiled, kind, st, noise, cond, T) -> tuple[dict, torch.Tensor]:
    K, dev, sync = st.block_size, args.device, sync_for(args.device)
    static = kind != "kv"
    cache = model.new_cache(block_size=K, window=args.window, sink=args.sink, static=static,
                            order="ring" if kind == "static_ring" else "frame")
    warm = min(noise.shape[1], args.sink + args.window + 2 * K)
    stream(model, compiled, cache, noise[:, :warm], cond, st, sync)  # kernels, compilation, allocation
    cache.reset()  # a static cache keeps its buffers; compiled graphs keep reading them in place
    memory_kind = reset_peak(dev)
    times, ctx, latents = stream(model, compiled, cache, noise, cond, st, sync)
    F, total = noise.shape[1], sum(times)
    flops = stream_flops(mc, st, ctx, F, T, cond.text.shape[1])
    row = {"student": st.name, "cache": kind, "block_size": K, "latent_fps": F / total,
           "video_fps_no_decode": (1 + args.temporal * (F - 1)) / total, "first_frame_latency_ms": 1e3 * times[0],
           "steady_ms_per_block": 1e3 * statistics.median(times[len(times) // 2:]), "peak_mem_mib": peak_mib(dev),
           "cache_mib": cache.memory_bytes() / 2**20, "context_frames_max": max(ctx),
           "memory_kind": memory_kind, "model_tflops": flops / total / 1e12,
           "gemm_tflops_now": matmul_peak(dev, args.dtype, args.peak_n) / 1e12}  # right after: was it quiet?
    return row, latents


def setup(args):
    """The model (random weights, `args.dtype`), the optionally compiled one, conditioning, noise, tokens/frame."""
    h, w = args.height // args.spatial, args.width // args.spatial  # latent frame size
    over = dict(in_channels=args.latent_channels, out_channels=args.latent_channels)
    if args.patch:
        over["patch_size"] = (1, args.patch, args.patch)
    mc = C.model_preset(args.preset, **over)
    ph, pw = mc.patch_size[1:]
    if h % ph or w % pw or args.height % args.spatial or args.width % args.spatial:
        raise SystemExit(f"{args.height}x{args.width} pixels do not split into {args.spatial}x latents and "
                         f"{ph}x{pw} patches")
    torch.manual_seed(0)
    model = build_denoiser(mc, args.device).to(args.dtype).eval()
    if args.fuse:
        model.net.fuse_qkv_projections()  # inference only: q/k/v as one matmul (diffusers' fused layout)
    compiled = None
    if args.compile:
        torch._dynamo.config.recompile_limit = 64  # one graph per student shape (K) and forward kind
        compiled = Denoiser(torch.compile(model.net, backend=args.compile_backend, mode=args.compile_mode,
                                          dynamic=False))
    g = torch.Generator().manual_seed(0)
    cond = Cond(torch.randn(1, args.text_tokens, mc.text_dim, generator=g).to(args.device, args.dtype))
    noise = torch.randn(1, args.frames, mc.in_channels, h, w, generator=g).to(args.device, args.dtype)
    return mc, model, compiled, cond, noise, (h // ph) * (w // pw)


def main(argv=None) -> int:
    args = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    mc, model, compiled, cond, noise, T = setup(args)
    sync = sync_for(args.device)
    peak = matmul_peak(args.device, args.dtype, args.peak_n)
    codec, vae_note = build_vae(args)
    kinds = [k for k in CACHES if k in args.caches.split(",")] + (["static_compiled"] if compiled is not None else [])
    students = [s for s in STUDENTS if s.name in args.students.split(",")]
    rows, first = [], {}  # first: each student's reference latents (its first row's)
    for st in students:
        for kind in kinds:
            row, latents = run_row(args, mc, model, compiled if kind == "static_compiled" else None,
                                   "static" if kind == "static_compiled" else kind, st, noise, cond, T)
            row["cache"] = kind
            ref = first.setdefault(st.name, latents)
            row["max_abs_diff_vs_kv"] = float((latents.float() - ref.float()).abs().max())
            rows.append(row)
    for st in students if codec is not None else []:  # after every stream, so no row's memory holds the VAE's
        decode_s = decode_seconds(codec, first[st.name], st.block_size, sync)
        gemm = matmul_peak(args.device, args.dtype, args.peak_n) / 1e12  # was the decode quiet?
        for row in (r for r in rows if r["student"] == st.name):
            row["decode_s"], row["decode_gemm_tflops_now"] = decode_s, gemm  # decode: the same latents, serially
            row["video_fps_decoded"] = codec.pixel_frames(args.frames) / (args.frames / row["latent_fps"] + decode_s)
    gemms = [r[k] for r in rows for k in ("gemm_tflops_now", "decode_gemm_tflops_now") if k in r]
    peak = max([peak] + [1e12 * g for g in gemms])  # the best GEMM of the run: jitter only lowers it
    for r in rows:
        r["fraction_of_peak"] = 1e12 * r["model_tflops"] / peak
    res = report(args, mc, model, T, peak, vae_note, rows)
    if args.out:
        args.out.write_text(json.dumps(res, indent=1))
    return 0


def report(args, mc, model, T, peak, vae_note, rows) -> dict:
    dev = torch.cuda.get_device_name(args.device) if args.device.type == "cuda" else "cpu"
    res = {"device": dev, "torch": torch.__version__, "threads": torch.get_num_threads(), "preset": args.preset,
           "loadavg_1min": os.getloadavg()[0],  # other jobs on this machine skew CPU figures
           "params_M": sum(p.numel() for p in model.parameters()) / 1e6, "dtype": str(args.dtype),
           "pixels": [args.height, args.width], "latents": [mc.in_channels, args.height // args.spatial,
                                                            args.width // args.spatial],
           "tokens_per_frame": T, "frames": args.frames, "window": args.window, "sink": args.sink,
           "text_tokens": args.text_tokens, "peak_tflops": peak / 1e12,
           "peak_kind": f"{args.dtype} GEMM {args.peak_n}^3", "vae": vae_note,
           "diff_reference": rows[0]["cache"] if rows else None,  # max_abs_diff_vs_kv is against this row
           "rows": rows}
    print(f"{res['preset']} ({res['params_M']:.1f}M params, {res['dtype']}) on {dev}, {res['threads']}"
          f" threads: {args.height}x{args.width} px -> {res['latents'][1]}x{res['latents'][2]} latents, {T} tokens/"
          f"frame, {args.frames} latent frames, window {args.window} + sink {args.sink}, {args.text_tokens} text "
          f"tokens; GEMM peak {peak / 1e12:.3f} TFLOP/s; {vae_note}")
    head = (f"{'student':<16} {'cache':<16} {'lat f/s':>8} {'vid f/s':>8} {'+decode':>8} {'1st ms':>8} "
            f"{'ms/blk':>8} {'mem MiB':>8} {'TFLOP/s':>8} {'%peak':>6} {'quiet':>6} {'|diff|':>8}")
    print(head)
    for r in rows:
        dec = f"{r['video_fps_decoded']:8.2f}" if "video_fps_decoded" in r else f"{'-':>8}"
        print(f"{r['student']:<16} {r['cache']:<16} {r['latent_fps']:8.2f} {r['video_fps_no_decode']:8.2f} {dec} "
              f"{r['first_frame_latency_ms']:8.1f} {r['steady_ms_per_block']:8.1f} {r['peak_mem_mib']:8.0f} "
              f"{r['model_tflops']:8.4f} {100 * r['fraction_of_peak']:6.2f} {r['gemm_tflops_now'] * 1e12 / peak:6.2f} "
              f"{r['max_abs_diff_vs_kv']:8.1e}")
    print("quiet: the GEMM right after the row over the run's best (1.00: nothing else slowed this machine); "
          f"|diff|: max |latents - the {res['diff_reference']} row's|")
    quiet = {r["student"]: round(r["decode_gemm_tflops_now"] * 1e12 / peak, 2) for r in rows if "decode_s" in r}
    if quiet:
        print(f"+decode: generation then a streaming decode of the same latents; quiet during the decode: {quiet}")
    return res


if __name__ == "__main__":
    sys.exit(main())
