"""Causal ODE pairs (Causal Forcing, spec §5.1): the AR teacher's probability-flow ODE per block, with the
ground-truth clean prefix as context, solved with Euler on an N-step shifted grid (with CFG), keeping the
states at the few-step anchor sigmas, the endpoint and the clean video.

Two modes give the same pairs (tested to fp32 tolerance):
* `cached`: block by block through `rollout` with the KV cache holding the ground-truth blocks < b;
* `packed`: all blocks at once, every frame at the same sigma, through the teacher-forcing plan (the
  reference's "full" mode): one forward per Euler step for the whole video.

The regression objective and the bidirectional-teacher baseline arrive with the distillation issue.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import flow
from ..models.attention import AttentionPlan
from ..models.conditioning import Cond
from ..models.denoiser import Guidance
from ..rollout import rollout
from ..sampling import euler

Tensor = torch.Tensor


@dataclass
class ODEPairs:
    states: Tensor  # [B, A, F, C, H, W] teacher states at the anchor sigmas
    sigmas: Tensor  # [A] the anchor sigmas (exact)
    endpoint: Tensor  # [B, F, C, H, W] the ODE solution at sigma 0 (the regression target)
    clean: Tensor  # [B, F, C, H, W] ground truth, the student's context


@torch.no_grad()
def generate_pairs(teacher, x_gt: Tensor, cond: Cond, noise: Tensor, *, block_size: int, steps: int, shift: float,
                   anchors: Tensor, guidance: Guidance | None = None, mode: str = "cached") -> ODEPairs:
    """Solve the AR teacher's per-block ODE from `noise` (sigma 1) and keep the states at `anchors`."""
    sig = flow.grid(steps, shift)
    idx = flow.grid_indices(anchors.to(torch.float64), steps, shift)  # fails loudly if anchors are off the grid
    sig32 = sig.float()
    if mode == "packed":
        plan = AttentionPlan("teacher_forcing", block_size)
        x, keep = noise, {}
        B, F = noise.shape[:2]
        for n in range(steps):
            if n in idx:
                keep[n] = x
            s, s_next = torch.full((B, F), float(sig32[n])), torch.full((B, F), float(sig32[n + 1]))
            v = teacher.velocity(x, s, cond, plan=plan, clean=x_gt, guidance=guidance)
            x = flow.euler_step(x, v, s, s_next)
        states, endpoint = torch.stack([keep[i] for i in idx], dim=1), x
    elif mode == "cached":
        blocks, block_states = [], []

        def sampler(den, xb, sigmas, c, **kw):
            keep = {0: xb} if 0 in idx else {}
            out = euler(den, xb, sigmas, c, callback=lambda i, y: keep.__setitem__(i + 1, y), **kw)
            block_states.append(torch.stack([keep[i] for i in idx], dim=1))  # [B, A, K, ...]
            return out

        for blk in rollout(teacher, noise, cond, sampler=sampler, sigmas=sig32, block_size=block_size,
                           guidance=guidance, teacher_context=x_gt, commit_last=False):
            blocks.append(blk.x0)
        states, endpoint = torch.cat(block_states, dim=2), torch.cat(blocks, dim=1)
    else:
        raise ValueError(f"unknown ODE-pair mode {mode!r}; choose cached or packed")
    return ODEPairs(states, anchors.float(), endpoint, x_gt)
