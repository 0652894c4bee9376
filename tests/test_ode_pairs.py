"""Causal ODE pairs: cached block-wise generation equals the packed teacher-forcing mode (method.md §5.1)."""

import pytest
import torch

from framecast import flow
from framecast.data.vectors import ARTeacher, VectorMixture
from framecast.models.conditioning import Cond
from framecast.models.denoiser import Guidance
from framecast.objectives.ode import generate_pairs

ANCHORS = flow.few_step_sigmas([1000, 750, 500, 250], 5.0)


@pytest.mark.parametrize("K", [1, 3])
def test_cached_pairs_equal_packed_pairs(tiny_model, K):
    B, F = 2, 6
    x_gt, noise = torch.randn(B, F, 3, 8, 8), torch.randn(B, F, 3, 8, 8)
    cond = Cond(torch.randn(B, 4, 32))
    g = Guidance(3.0, Cond(torch.zeros(B, 4, 32)))
    kw = dict(block_size=K, steps=8, shift=5.0, anchors=flow.few_step_sigmas([1000, 500], 5.0), guidance=g)
    cached = generate_pairs(tiny_model, x_gt, cond, noise, mode="cached", **kw)
    packed = generate_pairs(tiny_model, x_gt, cond, noise, mode="packed", **kw)
    assert cached.states.shape == (B, 2, F, 3, 8, 8)
    torch.testing.assert_close(cached.states, packed.states, atol=1e-4, rtol=0)
    torch.testing.assert_close(cached.endpoint, packed.endpoint, atol=1e-4, rtol=0)
    torch.testing.assert_close(cached.states[:, 0], noise)  # anchor sigma 1 is the starting noise


def test_pairs_from_the_analytic_ar_teacher_use_the_ground_truth_context():
    mix = VectorMixture.toy_a(num_frames=2)
    x_gt, _ = mix.sample(256, torch.Generator().manual_seed(0))
    noise = torch.randn(x_gt.shape, generator=torch.Generator().manual_seed(1))
    teacher = ARTeacher(mix)
    cond = Cond(torch.zeros(256, 1, 1))
    pairs = generate_pairs(teacher, x_gt, cond, noise, block_size=1, steps=48, shift=5.0, anchors=ANCHORS)
    packed = generate_pairs(teacher, x_gt, cond, noise, block_size=1, steps=48, shift=5.0, anchors=ANCHORS,
                            mode="packed")
    torch.testing.assert_close(pairs.endpoint, packed.endpoint, atol=1e-5, rtol=0)
    # frame 2 follows the sign of the ground-truth frame 1 it was conditioned on, whatever its noise
    agree = (pairs.endpoint[:, 1].sign() == x_gt[:, 0].sign()).float().mean()
    assert agree > 0.99


def test_anchors_must_lie_on_the_grid(tiny_model):
    x = torch.randn(1, 2, 3, 8, 8)
    with pytest.raises(ValueError, match="not on the 10-step"):
        generate_pairs(tiny_model, x, Cond(torch.zeros(1, 4, 32)), x, block_size=1, steps=10, shift=5.0,
                       anchors=ANCHORS)
