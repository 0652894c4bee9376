"""Stage-2 cost: causal ODE (pair generation + regression) vs causal CD, and cached vs packed pair generation.

    python benchmarks/stage2.py                    # toy preset, 8 frames of 32x32, batch 8, 48-point grid
    python benchmarks/stage2.py --json docs/stage2.json

Everything is timed in one run on random weights (speed does not depend on them), with the same model,
batch and grid for both methods (method.md §5, §6):

* pair generation: `generate_pairs` in `cached` mode (block by block, KV cache of ground-truth context)
  vs `packed` mode (every Euler step one teacher-forcing forward over [clean ; noisy]); both with CFG, so
  every Euler step is a doubled batch. The two must agree (printed).
* ODE regression step: one student forward + backward at an anchor (the pairs already exist).
* CD step: one teacher Euler step with CFG + one EMA-target forward + one student forward + backward.

It prints per-step times and the totals for `--train-steps` optimiser steps, where ODE also pays for
`--pairs` trajectories, as ratios measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from framecast import config as C
from framecast import flow
from framecast.data.batch import Batch
from framecast.models.conditioning import Cond
from framecast.models.denoiser import Guidance
from framecast.objectives.consistency import CausalCD
from framecast.objectives.ode import ODERegression, generate_pairs
from framecast.generate import build_denoiser


def timed(fn, reps: int) -> float:
    """Median seconds of `reps` calls after one warm-up call."""
    fn()
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return sorted(out)[len(out) // 2]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="toy")
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--block", type=int, default=1)
    p.add_argument("--grid", type=int, default=48)
    p.add_argument("--pairs", type=int, default=256, help="ODE trajectories in the comparison total")
    p.add_argument("--train-steps", type=int, default=300, help="optimiser steps of either method")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--json", default="")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    mc = C.model_preset(a.preset)
    teacher, student = build_denoiser(mc).eval(), build_denoiser(mc)
    B, F, S = a.batch, a.frames, a.size
    g = torch.Generator().manual_seed(0)
    x_gt = torch.randn(B, F, mc.in_channels, S, S, generator=g)  # [B, F, C, H, W]
    noise = torch.randn(x_gt.shape, generator=g)
    cond, null = Cond(torch.randn(B, 16, mc.text_dim, generator=g)), Cond(torch.zeros(B, 16, mc.text_dim))
    cfg = Guidance(3.0, null)
    anchors = flow.few_step_sigmas([1000, 750, 500, 250], 5.0)
    kw = dict(block_size=a.block, steps=a.grid, shift=5.0, anchors=anchors, guidance=cfg)

    results = {}
    cached = generate_pairs(teacher, x_gt, cond, noise, mode="cached", **kw)
    packed = generate_pairs(teacher, x_gt, cond, noise, mode="packed", **kw)
    agree = float((cached.endpoint - packed.endpoint).abs().max())
    reps = max(1, a.reps - 1)  # a whole solve is long; fewer repetitions
    t_cached = timed(lambda: generate_pairs(teacher, x_gt, cond, noise, mode="cached", **kw), reps)
    t_packed = timed(lambda: generate_pairs(teacher, x_gt, cond, noise, mode="packed", **kw), reps)
    results["pairs_cached_s_per_traj"] = t_cached / B
    results["pairs_packed_s_per_traj"] = t_packed / B
    results["pairs_cached_speedup"] = t_packed / t_cached
    results["pairs_max_abs_diff"] = agree

    batch = Batch(x_gt, cond, null, [""] * B, {"states": cached.states, "endpoint": cached.endpoint})
    ode = ODERegression(student, anchors=anchors, block_size=a.block)
    cd = CausalCD(student, teacher, steps=a.grid, shift=5.0, block_size=a.block, guidance=3.0, target_decay=0.99,
                  few_step_sigmas=anchors)

    def step(obj):
        def run():
            loss = obj.losses(batch, 0, torch.Generator().manual_seed(1))["model"][0]
            loss.backward()
            student.zero_grad(set_to_none=True)
        return run

    results["ode_step_s"] = timed(step(ode), a.reps)
    results["cd_step_s"] = timed(step(cd), a.reps)
    ode_total = a.pairs * results["pairs_cached_s_per_traj"] + a.train_steps * results["ode_step_s"]
    cd_total = a.train_steps * results["cd_step_s"]
    results.update(ode_total_s=ode_total, cd_total_s=cd_total, ode_over_cd=ode_total / cd_total,
                   pair_store_mb=a.pairs * (cached.states[0].numel() + 2 * x_gt[0].numel()) * 4 / 2**20,
                   config=vars(a))

    print(f"Stage-2 cost, preset {a.preset}, {F} frames of {S}x{S}, batch {B}, K={a.block}, {a.grid}-point grid, "
          f"CFG 3 (threads {torch.get_num_threads()})")
    print(f"  pair generation, cached block-wise : {results['pairs_cached_s_per_traj'] * 1e3:8.1f} ms / trajectory")
    print(f"  pair generation, packed TF forward : {results['pairs_packed_s_per_traj'] * 1e3:8.1f} ms / trajectory")
    print(f"  cached speed-up over packed        : {results['pairs_cached_speedup']:8.2f}x  "
          f"(max |endpoint diff| {agree:.1e})")
    print(f"  ODE regression step                : {results['ode_step_s'] * 1e3:8.1f} ms")
    print(f"  CD step (teacher CFG + target + student): {results['cd_step_s'] * 1e3:8.1f} ms "
          f"({results['cd_step_s'] / results['ode_step_s']:.2f}x an ODE step)")
    print(f"  total, {a.train_steps} steps: ODE {ode_total:.0f} s ({a.pairs} pairs + regression, "
          f"{results['pair_store_mb']:.0f} MB store) vs CD {cd_total:.0f} s -> ODE/CD = {results['ode_over_cd']:.2f}x")
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
