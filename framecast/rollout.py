"""The ONE autoregressive block loop (architecture.md §2).

Offline sampling, streaming sessions, ODE-pair generation and DMD self-rollout all call
`rollout`. Per block b of K frames at absolute frame offset f_b:

    x0_b = sampler(denoiser, noise_b, sigmas_b, cond_b, cache=cache, positions=f_b..f_b+K-1)   # reads cache
    denoiser.commit(x0_b, ...)                                                               # one write

so block b conditions on the committed clean output of blocks < b (method.md §3.4, §8). A clean prefix
(I2V first frame, continuation) is committed first, block by block, and is not yielded.

A bidirectional model is the special case of one block spanning the whole video (`block_size = F`).
Training changes what a block is conditioned on through two options of `rollout`: `SelfRollout` (DMD's
self-rollout gradient policy, method.md §7.2) and `teacher_context` (the ground-truth prefix of causal ODE
pairs, method.md §5.1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

from . import flow
from . import rng
from .models.conditioning import Cond
from .models.denoiser import Guidance
from .models.kv_cache import KVCache
from .sampling import Sampler

Tensor = torch.Tensor


@dataclass
class Block:
    index: int  # block number among the generated blocks
    start: int  # absolute frame position of its first frame
    x0: Tensor  # [B, K, C, H, W] clean output


@dataclass(frozen=True)
class SelfRollout:
    """The self-rollout gradient policy of training (method.md §7.2), for the `few_step` sampler.

    Every block stops at denoising step `exit_step` (the first block at `first_exit_step` when it has its own
    schedule, `first_sigmas`; None: `exit_step` too), only that forward keeps grad, and the context is
    committed without grad. With `context_sigma > 0` each block's output is re-noised to that level before
    it is committed, and every commit (prefix included) is labelled with it (method.md §12.8); 0 commits
    the clean output, as inference does.
    """

    exit_step: int
    first_exit_step: int | None = None
    context_sigma: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.context_sigma < 1.0:
            raise ValueError(f"context_sigma must be in [0, 1), got {self.context_sigma}")

    def exit_for(self, first: bool) -> int:
        """The exit step of a block; `first`: the first block, sampled on its own schedule."""
        return self.first_exit_step if first and self.first_exit_step is not None else self.exit_step


def rollout(
    denoiser,
    noise: Tensor,
    cond: Cond,
    *,
    sampler: Sampler,
    sigmas: Tensor,
    block_size: int,
    first_sigmas: Tensor | None = None,
    context: Tensor | None = None,
    cache: KVCache | None = None,
    window: int = 0,
    sink: int = 0,
    guidance: Guidance | None = None,
    commit_last: bool = True,
    generator: torch.Generator | None = None,
    # training only: at most one of the two (what block b is conditioned on)
    self_rollout: SelfRollout | None = None,
    teacher_context: Tensor | None = None,
) -> Iterator[Block]:
    """Generate `noise.shape[1]` frames block by block, yielding each block as soon as it is done.

    Args:
        noise: [B, F, C, H, W] starting noise for the generated frames.
        cond: conditioning; `cond.actions`, if any, is indexed by absolute frame (prefix included).
        sampler, sigmas: the per-block sampler and its sigma list (sampling.py).
        first_sigmas: a separate schedule for the first generated block (method.md §7.6: 4 steps for 1/2-step models).
        context: clean prefix frames [B, P, C, H, W] committed before generation (I2V / continuation).
        cache: continue an existing stream (its frames count as context); default a fresh cache.
        window, sink: attention window of a fresh cache (frames, counting the current block).
        commit_last: commit the last block too (needed to continue the stream later).
        generator: the sampler's and the context re-noising's randomness.

    Two training options change what the blocks are conditioned on; by default (inference) block b sees the
    clean committed output of blocks < b:

        self_rollout: a `SelfRollout`, the gradient policy of DMD's self-rollout (method.md §7.2): per-block
            exit step, grad on the exit forward only, context committed without grad and, with its
            `context_sigma > 0`, re-noised to that level first (method.md §12.8).
        teacher_context: [B, F, C, H, W] clean frames committed instead of the generated blocks, so block b is
            conditioned on the ground-truth prefix (causal ODE pairs, method.md §5.1, §12.17).
    """
    B, F = noise.shape[:2]
    if teacher_context is not None and teacher_context.shape != noise.shape:
        raise ValueError(f"teacher_context {tuple(teacher_context.shape)} must match noise {tuple(noise.shape)}")
    if teacher_context is not None and self_rollout is not None:
        raise ValueError("give self_rollout or teacher_context, not both: they condition blocks on different context")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    context_sigma = 0.0 if self_rollout is None else self_rollout.context_sigma  # commit noise level
    if cache is None:
        cache = denoiser.new_cache(block_size=block_size, window=window, sink=sink)
    if context is not None:
        if context.shape[0] != B or context.shape[2:] != noise.shape[2:]:
            raise ValueError(f"context {tuple(context.shape)} does not match noise {tuple(noise.shape)}")
        for s in range(0, context.shape[1], block_size):
            e = min(s + block_size, context.shape[1])
            pos = torch.arange(cache.end, cache.end + e - s, device=noise.device)
            start = int(pos[0])
            denoiser.commit(context[:, s:e], cond.frames(start, start + e - s), cache, positions=pos,
                            sigma=context_sigma, guidance=_frames(guidance, start, start + e - s))
    offset = cache.end
    for b, s in enumerate(range(0, F, block_size)):
        e = min(s + block_size, F)
        pos = torch.arange(offset + s, offset + e, device=noise.device)
        block_cond = cond.frames(offset + s, offset + e)
        block_guidance = _frames(guidance, offset + s, offset + e)
        first = b == 0 and first_sigmas is not None
        sched = first_sigmas if first else sigmas
        kw = {} if self_rollout is None else {"exit_step": self_rollout.exit_for(first)}
        x0 = sampler(denoiser, noise[:, s:e], sched, block_cond, cache=cache, positions=pos,
                     guidance=block_guidance, generator=generator, **kw)
        if e < F or commit_last:
            ctx = (x0 if teacher_context is None else teacher_context[:, s:e]).detach()
            if context_sigma > 0:  # self-rollout re-noising (method.md §12.8)
                eps = rng.randn(ctx.shape, generator).to(ctx)
                ctx = flow.add_noise(ctx, eps, torch.full(ctx.shape[:2], context_sigma, device=ctx.device))
            denoiser.commit(ctx, block_cond, cache, positions=pos, sigma=context_sigma, guidance=block_guidance)
        yield Block(b, offset + s, x0)


def _frames(guidance: Guidance | None, start: int, end: int) -> Guidance | None:
    """The guidance of absolute frames [start, end): a null branch with actions (world models) is sliced like
    the conditional one; text-only guidance is the same for every block."""
    if guidance is None or guidance.null.actions is None:
        return guidance
    return Guidance(guidance.scale, guidance.null.frames(start, end))


def generate(denoiser, noise: Tensor, cond: Cond, **kw) -> Tensor:
    """Run `rollout` to the end and return the generated frames [B, F, C, H, W]."""
    kw.setdefault("commit_last", False)
    return torch.cat([blk.x0 for blk in rollout(denoiser, noise, cond, **kw)], dim=1)
