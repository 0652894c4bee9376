"""Gradient checkpointing of cached forwards (DMD's self-rollout exit steps) gives the gradients of no
checkpointing: the recompute in backward reads the cache as it was (models/kv_snapshot.py), not as later
commits left it; for an unbounded cache, with a window (evicting) and for the static ring buffer."""

from __future__ import annotations

import pytest
import torch

from framecast import config as C
from framecast.generate import build_denoiser
from framecast.models.conditioning import Cond
from framecast.rollout import SelfRollout, generate
from framecast.sampling import few_step


def _grads(checkpointing: bool, *, window: int, static: bool, exit_step: int = 1):
    torch.manual_seed(0)
    model = build_denoiser(C.model_preset("tiny", gradient_checkpointing=checkpointing))
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(2, 5, 3, 16, 16, generator=g)  # [B, F, C, H, W]
    cond = Cond(torch.randn(2, 8, 32, generator=g))
    sig = torch.tensor([1.0, 0.6])
    kw = dict(sampler=few_step, sigmas=sig, block_size=1, self_rollout=SelfRollout(exit_step, None, 0.0),
              generator=torch.Generator().manual_seed(2))
    if window or static:
        kw["cache"] = model.new_cache(block_size=1, window=window, static=static, max_frames=0 if window else 5)
    x = generate(model, noise, cond, **kw)  # [B, F, C, H, W], grad through every block's exit step
    (x.square().mean() + x[:, -1].mean()).backward()
    return x.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("window,static", [(0, False), (3, False), (3, True)])
def test_checkpointed_rollout_gives_the_same_gradients(window, static):
    x0, g0 = _grads(False, window=window, static=static)
    x1, g1 = _grads(True, window=window, static=static)
    torch.testing.assert_close(x1, x0, rtol=0, atol=0)
    assert g0.keys() == g1.keys() and len(g0) > 10
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-5, atol=1e-6, msg=k)


def test_checkpointing_saves_less_for_backward():
    """What autograd keeps between the rollout and backward shrinks (the point of checkpointing)."""
    sizes = []
    for flag in (False, True):
        kept = []

        def pack(t):
            kept.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            _grads(flag, window=0, static=False)
        sizes.append(sum(kept))
    assert sizes[1] < 0.6 * sizes[0], sizes
