"""One optimiser step of Stage 1, causal CD and DMD through framecast's training code: time, memory, FLOP/s.

    torchrun --nproc_per_node 1 benchmarks/train_step.py --out train_step.json   # GPU: wan2.1-1.3b, FSDP2 + bf16
    python benchmarks/train_step.py --device cpu                                  # CPU: tiny preset, a small shape

Each stage is built as `framecast pipeline` builds it: a RunConfig (`config.from_dict`), random-weight networks
from `build_denoiser` for the model and each role the stage record names (cd: teacher; dmd: real, critic), the
stage's builder (`stages.get(stage).build`), under torchrun `distributed.init` + `shard_and_load` (FSDP2 per block,
the run's mixed precision; a no-op in one process), then a `Trainer` whose `_step` runs 1 warm-up and `--steps`
timed steps (never `fit`, which would write a checkpoint). Frames are latents (`model.codec: identity`), drawn at
random by `RandomLatents`, so no VAE or text encoder runs. DMD trains the generator and the critic in every
step (dmd.critic_ratio=1); cd and dmd keep the generator EMA of the Wan recipes (configs/wan2.1-1.3b),
updated every step as after their ema_start (`--no-ema` drops it).

Model FLOPs per step (`forward_flops`, 2 per multiply-add, attention included; a backward = 2 forwards, so a
trained forward counts 3x; gradient checkpointing's recomputation is not counted, as in MFU), per sample, with
L = frames x tokens per frame and T tokens per frame:
    stage1  3 x forward over the packed teacher-forcing sequence (2L queries, 2L keys)
    cd      teacher with CFG (2 x, packed) + target (packed, no grad) + student 3 x (packed)
    dmd     the self-rollout: per block of n frames after c context frames, the few-step forwards up to the step's
            exit step (nT queries, (c + n)T keys), the exit forward 3 x, plus the commit forward (every block but
            the last); the text K/V only where computed (grad forwards and the first forward on the cache), then
            the fake score (no grad) + the real score with CFG (2 x) + the critic 3 x, on L tokens.
`fraction_of_peak` = model FLOP/s / the best GEMM of the run in the compute dtype (bf16 on CUDA under FSDP2,
fp32 on CPU), measured before and after the stages (both recorded). CPU figures move with whatever else runs on
the machine: the JSON records the load average.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.distributed.fsdp import FSDPModule

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # this checkout's framecast, installed or not
sys.path.append(str(HERE))  # wan_stream's helpers (already first on the path when run as a script)

from wan_stream import matmul_peak, peak_mib, reset_peak, sync_for  # noqa: E402

from framecast import config as C  # noqa: E402
from framecast import rng  # noqa: E402
from framecast import stages as S  # noqa: E402
from framecast.data.batch import Batch  # noqa: E402
from framecast.generate import build_denoiser  # noqa: E402
from framecast.models.conditioning import Cond  # noqa: E402
from framecast.models.transformer import forward_flops  # noqa: E402
from framecast.train import distributed  # noqa: E402
from framecast.train.loop import Trainer  # noqa: E402
from framecast.train.sharded_load import shard_and_load  # noqa: E402

STAGES = ("stage1", "cd", "dmd")
EMA = {"stage1": 0.0, "cd": 0.99, "dmd": 0.99}  # train.ema_decay of configs/wan2.1-1.3b/*.yaml


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="auto (cuda if available) | cpu | cuda")
    p.add_argument("--preset", default=None, help="model preset; default wan2.1-1.3b on CUDA, tiny on CPU")
    # Wan2.1: 81 frames at 480x832 -> 21 latent frames of 60x104 through the VAE's 4x8x8 stride (1 + 80/4, /8, /8)
    p.add_argument("--frames", type=int, default=None, help="latent frames; default 21 on CUDA, 4 on CPU")
    p.add_argument("--height", type=int, default=None, help="latent height; default 60 on CUDA, 8 on CPU")
    p.add_argument("--width", type=int, default=None, help="latent width; default 104 on CUDA, 8 on CPU")
    p.add_argument("--channels", type=int, default=16, help="latent channels (the Wan VAE's z_dim)")
    p.add_argument("--text-tokens", type=int, default=None, help="default 512 (Wan's umT5 length) CUDA, 8 CPU")
    p.add_argument("--text-dim", type=int, default=None, help="default the preset's (4096 for Wan: umT5-XXL)")
    p.add_argument("--batch", type=int, default=1, help="train.batch_size (per rank)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per stage, after 1 warm-up step")
    p.add_argument("--denoising-steps", default="1000,500", help="few_step.denoising_steps (2-step)")
    p.add_argument("--grid-steps", type=int, default=48, help="cd.grid_steps")
    p.add_argument("--block-size", type=int, default=1, help="objective.block_size (1: frame-wise)")
    p.add_argument("--mixed-precision", default=None, help="dist.mixed_precision; default bf16 CUDA, none CPU")
    p.add_argument("--no-checkpointing", dest="checkpointing", action="store_false",
                   help="model.gradient_checkpointing=false (default true, as the Wan recipes)")
    p.add_argument("--no-ema", dest="ema", action="store_false", help="no generator EMA in cd and dmd")
    p.add_argument("--attention", default="sdpa", help="model.attention_backend: sdpa | flex (CUDA)")
    p.add_argument("--stages", default=",".join(STAGES))
    p.add_argument("--peak-n", type=int, default=None, help="GEMM size for the peak; default 8192 CUDA, 1024 CPU")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="write the figures as JSON")
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error("--steps must be >= 1")
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    args.device = "cuda" if cuda else "cpu"
    for name, gpu, cpu in [("preset", "wan2.1-1.3b", "tiny"), ("frames", 21, 4), ("height", 60, 8),
                           ("width", 104, 8), ("text_tokens", 512, 8), ("mixed_precision", "bf16", "none"),
                           ("peak_n", 8192, 1024)]:
        if getattr(args, name) is None:
            setattr(args, name, gpu if cuda else cpu)
    args.text_dim = args.text_dim or C.model_preset(args.preset).text_dim
    args.denoising_steps = [int(s) for s in args.denoising_steps.split(",")]
    return args


def run_config(args, stage: str) -> C.RunConfig:
    """The run's config; data.num_frames/height/width are latent sizes: the identity codec's frames are latents."""
    return S.normalise(C.from_dict({
        "stage": stage,
        "model": {"preset": args.preset, "in_channels": args.channels, "out_channels": args.channels,
                  "text_dim": args.text_dim, "codec": "identity", "gradient_checkpointing": args.checkpointing,
                  "attention_backend": args.attention},
        "data": {"num_frames": args.frames, "height": args.height, "width": args.width, "text_encoder": "hash",
                 "text_tokens": args.text_tokens},
        "objective": {"block_size": args.block_size},
        "few_step": {"denoising_steps": args.denoising_steps},
        "cd": {"grid_steps": args.grid_steps},
        "dmd": {"critic_ratio": 1},  # every timed step trains the generator and the critic
        "train": {"batch_size": args.batch, "device": args.device, "progress": False,
                  "ema_decay": EMA[stage] if args.ema else 0.0},
        "dist": {"mixed_precision": args.mixed_precision}}))


class RandomLatents:
    """A data source of random latents [B, F, C, h, w] and text states [B, L, D]: speed does not depend on the
    data. Drawn with `rng.randn`, so each sample comes from the trainer's per-sample generator (rng.Draws)."""

    def __init__(self, cfg: C.RunConfig) -> None:
        d, m = cfg.data, cfg.model
        self.video, self.text = (d.num_frames, m.in_channels, d.height, d.width), (d.text_tokens, m.text_dim)

    def batch(self, batch_size: int, generator) -> Batch:
        text = rng.randn((batch_size, *self.text), generator)
        return Batch(rng.randn((batch_size, *self.video), generator), Cond(text), Cond(torch.zeros_like(text)),
                     [""] * batch_size)


def tokens(cfg: C.RunConfig) -> tuple[int, int]:
    """(tokens per frame (h/ph)(w/pw), tokens of the video), from the config's latent size and patch."""
    ph, pw = cfg.model.patch_size[1:]
    if cfg.data.height % ph or cfg.data.width % pw:
        raise SystemExit(f"{cfg.data.height}x{cfg.data.width} latents do not split into {ph}x{pw} patches")
    T = (cfg.data.height // ph) * (cfg.data.width // pw)
    return T, cfg.data.num_frames * T


def rollout_flops(cfg: C.RunConfig, exit_step: int, first_exit: int | None, ff) -> float:
    """DMD's self-rollout (rollout.py + sampling.few_step under SelfRollout): see the module docstring."""
    K, F = cfg.objective.block_size, cfg.data.num_frames
    T, _ = tokens(cfg)
    total, text_cached = 0.0, False  # no-grad forwards on the cache reuse its per-prompt text K/V
    for b, s in enumerate(range(0, F, K)):
        n = min(K, F - s)
        q, k = n * T, (s + n) * T  # the block's queries against the committed context and itself
        last = first_exit if b == 0 and first_exit is not None else exit_step
        for j in range(last + 1):
            grad = j == last
            total += (3 if grad else 1) * ff(q, k, text_kv=grad or not text_cached)
            text_cached = text_cached or not grad
        if s + n < F:  # generate() commits every block but the last
            total += ff(q, k, text_kv=not text_cached)
            text_cached = True
    return total


def step_flops(cfg: C.RunConfig, objective, trainer: Trainer, step: int) -> float:
    """Model FLOPs of one step of this rank (batch_size x grad_accum samples): see the module docstring."""
    _, L = tokens(cfg)

    def ff(q: int, k: int, text_kv: bool = True, out: int | None = None) -> float:
        return forward_flops(cfg.model, q, k, cfg.data.text_tokens, text_kv=text_kv, out_tokens=out)

    packed = ff(2 * L, 2 * L, out=L)  # [clean ; noisy]: the head projects the noisy half only
    if cfg.stage == "stage1":
        per = 3 * packed
    elif cfg.stage == "cd":
        per = (2 if cfg.cd.guidance != 1.0 else 1) * packed + packed + 3 * packed
    else:  # dmd: the step's exit steps come from its shared generator, as in AsymmetricDMD.losses
        e, e0 = objective.exit_steps(trainer.draws(step, 0))
        real = 2 if cfg.dmd.real_guidance != 1.0 else 1
        per = rollout_flops(cfg, e, e0, ff) + (1 + real + 3) * ff(L, L)
    return cfg.train.batch_size * cfg.train.grad_accum * per


def build(cfg: C.RunConfig, dist, dev: torch.device):
    """(plan, model): random networks for the model and every role of the stage, its objective, FSDP2."""
    torch.manual_seed(cfg.train.seed)

    def net():
        d = build_denoiser(cfg.model, dev)
        d.net.gradient_checkpointing = cfg.model.gradient_checkpointing  # as stages.load_role sets loaded roles
        d.net.attention_backend = cfg.model.attention_backend
        return d

    model = net()
    roles = {r.key.split(".")[1]: net() for r in S.get(cfg.stage).roles}
    plan = S.get(cfg.stage).build(cfg, model, RandomLatents(cfg), roles)
    shard_and_load(plan.objective, dist, {}, model, mixed_precision=cfg.dist.mixed_precision,
                   reshard_after_forward=True)  # every network of the objective; a no-op in one process
    return plan, model


def params(objective) -> tuple[int, int]:
    """(trained, frozen) parameters: the roles' trainable ones, and the rest of every network (teacher, real
    score, CD's target). DTensor numel is the global size, so both are whole-network counts."""
    nets = {id(m): m for m in distributed.networks(objective)}.values()
    total = sum(p.numel() for m in nets for p in m.parameters())
    trained = sum(p.numel() for m in objective.roles.values() for p in m.parameters() if p.requires_grad)
    return trained, total - trained


def run_stage(args, stage: str, dist, dev: torch.device) -> dict:
    cfg = run_config(args, stage)
    sync = sync_for(dev)
    gc.collect()
    memory_kind = reset_peak(dev)  # the peak covers weights, optimiser state, EMA and activations of this stage
    plan, _ = build(cfg, dist, dev)
    nets = distributed.networks(plan.objective)
    fsdp = all(isinstance(b, FSDPModule) for m in nets for b in m.net.blocks)
    trained, frozen = params(plan.objective)
    times, flops = [], []
    with tempfile.TemporaryDirectory() as run_dir:  # the trainer's folder; `_step` writes nothing there
        trainer = Trainer(cfg, plan.objective, plan.source, run_dir=run_dir, meta={}, optim=plan.optim, dist=dist)
        for m in trainer.roles.values():
            m.train()  # as fit() does
        for step in range(args.steps + 1):  # step 0 warms up: kernels, allocator, optimiser state
            sync()
            t0 = time.perf_counter()
            logs = trainer._step(step)
            sync()
            if step:
                times.append(time.perf_counter() - t0)
                flops.append(step_flops(cfg, plan.objective, trainer, step))
    return {"stage": stage, "step_s_median": statistics.median(times), "step_s": times,
            "peak_mem_mib": peak_mib(dev), "memory_kind": memory_kind, "params_trained": trained,
            "params_frozen": frozen, "model_tflop_per_step": statistics.mean(flops) / 1e12,
            "model_tflops": sum(flops) / sum(times) / 1e12, "fsdp2": fsdp, "roles": sorted(trainer.roles),
            "last_logs": {k: v for k, v in logs.items() if k.endswith("loss")}}


def main(argv=None) -> int:
    args = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dist = distributed.init(args.device)  # torchrun: the process group and mesh; one process: SINGLE
    dev = dist.device if dist.active else torch.device(args.device)
    # FSDP2's policy casts compute to bf16; without torchrun nothing is sharded and everything runs in fp32
    dtype = torch.bfloat16 if dist.active and args.mixed_precision == "bf16" else torch.float32
    before = matmul_peak(dev, dtype, args.peak_n)
    rows = []
    for stage in [s for s in STAGES if s in args.stages.split(",")]:
        rows.append(run_stage(args, stage, dist, dev))
        gc.collect()  # free this stage's networks and optimiser state before the next one is built
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    after = matmul_peak(dev, dtype, args.peak_n)
    peak = max(before, after)  # the best GEMM of the run: jitter only lowers it
    for r in rows:
        r["fraction_of_peak"] = 1e12 * r["model_tflops"] / peak
    res = report(args, dist, dev, dtype, before, after, rows)
    if args.out and dist.main:
        args.out.write_text(json.dumps(res, indent=1))
    if dist.active:
        distributed.close()
    return 0


def report(args, dist, dev, dtype, before: float, after: float, rows: list[dict]) -> dict:
    cfg = run_config(args, "stage1")
    T, L = tokens(cfg)
    res = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "torch": torch.__version__,
           "world_size": dist.world, "torchrun": dist.active, "dtype": str(dtype), "threads": torch.get_num_threads(),
           "loadavg_1min": os.getloadavg()[0], "preset": args.preset, "latents": [args.frames, args.channels,
           args.height, args.width], "tokens_per_frame": T, "video_tokens": L, "text_tokens": args.text_tokens,
           "text_dim": args.text_dim, "batch_per_rank": args.batch, "steps": args.steps,
           "denoising_steps": args.denoising_steps, "grid_steps": args.grid_steps, "block_size": args.block_size,
           "mixed_precision": args.mixed_precision, "gradient_checkpointing": args.checkpointing,
           "attention_backend": args.attention, "ema": args.ema, "gemm_tflops_before": before / 1e12,
           "gemm_tflops_after": after / 1e12, "peak_tflops": max(before, after) / 1e12,
           "peak_kind": f"{dtype} GEMM {args.peak_n}^3, best of before/after", "rows": rows}
    if not dist.main:
        return res
    print(f"{args.preset} on {res['device']} x {dist.world} ({'FSDP2' if dist.active else 'one process'}, "
          f"{dtype}), {res['threads']} threads: {args.frames} latent frames of {args.channels}x{args.height}x"
          f"{args.width} -> {T} tokens/frame, {L} tokens; {args.text_tokens} text tokens; batch {args.batch}; "
          f"GEMM {before / 1e12:.3f} / {after / 1e12:.3f} TFLOP/s before / after")
    print(f"{'stage':<8} {'step s':>8} {'mem MiB':>9} {'train M':>8} {'frozen M':>9} {'TFLOP/st':>9} "
          f"{'TFLOP/s':>8} {'%peak':>6} {'fsdp2':>6}")
    for r in rows:
        print(f"{r['stage']:<8} {r['step_s_median']:8.3f} {r['peak_mem_mib']:9.0f} {r['params_trained'] / 1e6:8.2f} "
              f"{r['params_frozen'] / 1e6:9.2f} {r['model_tflop_per_step']:9.3g} {r['model_tflops']:8.3g} "
              f"{100 * r['fraction_of_peak']:6.2f} {r['fsdp2']!s:>6}")
    return res


if __name__ == "__main__":
    sys.exit(main())
