"""Samplers and the one rollout loop, against analytic ground truths and the packed forward."""

import pytest
import torch

from framecast import flow
from framecast.eval.checks import Recorder, stream_vs_packed
from framecast.models.conditioning import Cond
from framecast.models.denoiser import Guidance
from framecast.models.kv_cache import KVCache
from framecast.rollout import SelfRollout, generate, rollout
from framecast.sampling import euler, few_step


class PointMass:
    """Data = one point x*: the exact velocity is (x - x*) / sigma, so both samplers must land on x*."""

    def __init__(self, target):
        self.target = target
        self.commits = []

    def velocity(self, x, sigma, cond, *, positions=None, **kw):
        target = self.target[:, positions] if positions is not None else self.target[:, : x.shape[1]]
        return (x - target) / flow._per_frame(sigma, x)

    def x0(self, x, sigma, cond, **kw):  # noqa: D102
        return flow.v_to_x0(x, self.velocity(x, sigma, cond, **kw), sigma)

    def new_cache(self, **kw):
        return KVCache(1, **kw)

    def commit(self, x0, cond, cache, *, positions=None, **kw):
        self.commits.append(positions.tolist())
        cache.frames = torch.cat([cache.frames, positions.cpu()])


def test_euler_and_few_step_are_exact_on_a_point_mass():
    target = torch.randn(2, 3, 4, 1, 1)
    d = PointMass(target)
    cond = Cond(torch.zeros(2, 1, 1))
    noise = torch.randn_like(target)
    out = euler(d, noise, flow.grid(7, 5.0).float(), cond)
    torch.testing.assert_close(out, target, atol=1e-5, rtol=0)
    g = torch.Generator().manual_seed(0)
    out = few_step(d, noise, flow.few_step_sigmas([1000, 750, 500, 250], 5.0).float(), cond, generator=g)
    torch.testing.assert_close(out, target, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="sigma = 0"):
        euler(d, noise, torch.tensor([1.0, 0.5]), cond)


def test_rollout_blocks_positions_and_commits():
    target = torch.randn(1, 7, 2, 1, 1)
    d = PointMass(target)
    cond = Cond(torch.zeros(1, 1, 1))
    blocks = list(rollout(d, torch.randn(1, 7, 2, 1, 1), cond, sampler=euler, sigmas=flow.grid(3, 1.0).float(),
                          block_size=3))
    assert [(b.index, b.start, b.x0.shape[1]) for b in blocks] == [(0, 0, 3), (1, 3, 3), (2, 6, 1)]
    assert d.commits == [[0, 1, 2], [3, 4, 5], [6]]
    torch.testing.assert_close(torch.cat([b.x0 for b in blocks], 1), target, atol=1e-5, rtol=0)


def test_first_block_schedule_and_context_prefix():
    seen = []

    def sampler(den, x, sigmas, cond, **kw):
        seen.append((len(sigmas), kw["positions"].tolist()))
        return x

    d = PointMass(torch.zeros(1, 9, 1, 1, 1))
    cond = Cond(torch.zeros(1, 1, 1))
    out = generate(d, torch.randn(1, 3, 1, 1, 1), cond, sampler=sampler, sigmas=torch.tensor([1.0]),
                   first_sigmas=torch.tensor([1.0, 0.9, 0.8, 0.6]), block_size=1,
                   context=torch.randn(1, 2, 1, 1, 1))
    assert out.shape[1] == 3
    assert d.commits[:2] == [[0], [1]]  # the prefix is committed first
    assert seen == [(4, [2]), (1, [3]), (1, [4])]  # 4-step first block, then 1-step (method.md §7.6)


@pytest.mark.parametrize("K, window", [(1, 0), (3, 0), (1, 3)])
def test_streamed_euler_equals_packed_prediction(tiny_model, K, window):
    """Every streamed denoising call equals the packed TF forward given the streamed output as clean context."""
    model = tiny_model
    F, B = 6, 2
    cond = Cond(torch.randn(B, 4, model.net.config.text_dim))
    guidance = Guidance(2.0, Cond(torch.zeros(B, 4, model.net.config.text_dim)))
    rec = Recorder(model)
    with torch.no_grad():
        video = generate(rec, torch.randn(B, F, 3, 8, 8), cond, sampler=euler, sigmas=flow.grid(3, 5.0).float(),
                         block_size=K, window=window, guidance=guidance)
        check = stream_vs_packed(model, video, rec.calls, cond, block_size=K, window=window, guidance=guidance)
    assert check["calls"] == 3 * ((F + K - 1) // K)
    assert check["max_abs_diff"] < 2e-5 and check["mean_abs_velocity"] > 0.1


def test_guidance_combines_branches(tiny_model):
    model = tiny_model
    x, sigma = torch.randn(1, 2, 3, 8, 8), torch.rand(1, 2)
    cond, null = Cond(torch.randn(1, 4, 32)), Cond(torch.zeros(1, 4, 32))
    with torch.no_grad():
        vc, vu = model.velocity(x, sigma, cond), model.velocity(x, sigma, null)
        vg = model.velocity(x, sigma, cond, guidance=Guidance(3.0, null))
    torch.testing.assert_close(vg, vu + 3.0 * (vc - vu), atol=2e-5, rtol=0)


def test_bidirectional_model_samples_as_one_block(tiny_model):
    """A bidirectional model is rollout with one block spanning the video; it equals cache-less Euler."""
    model = tiny_model
    cond = Cond(torch.randn(1, 4, 32))
    noise = torch.randn(1, 4, 3, 8, 8)
    sig = flow.grid(4, 5.0).float()
    with torch.no_grad():
        a = generate(model, noise, cond, sampler=euler, sigmas=sig, block_size=4)
        b = euler(model, noise, sig, cond)
    torch.testing.assert_close(a, b, atol=2e-5, rtol=0)


def test_self_rollout_gradient_policy(tiny_model):
    """Only each block's exit-step forward has grad; commits and earlier steps do not (method.md §7.2)."""
    model = tiny_model
    grad_modes = []
    orig_v, orig_commit = model.velocity, model.commit

    def spy_v(*a, **kw):
        grad_modes.append(("v", torch.is_grad_enabled()))
        return orig_v(*a, **kw)

    def spy_commit(*a, **kw):
        grad_modes.append(("commit", torch.is_grad_enabled()))
        return orig_commit(*a, **kw)

    model.velocity, model.commit = spy_v, spy_commit
    sig = flow.few_step_sigmas([1000, 750, 500, 250], 5.0).float()
    cond = Cond(torch.randn(1, 4, 32))
    cache = model.new_cache()
    video = generate(model, torch.randn(1, 3, 3, 8, 8), cond, sampler=few_step, sigmas=sig[:2], first_sigmas=sig,
                     block_size=1, cache=cache, commit_last=True, generator=torch.Generator().manual_seed(0),
                     self_rollout=SelfRollout(exit_step=1, first_exit_step=2, context_sigma=0.05))
    del model.velocity, model.commit
    # block 0: 3 forwards (exit 2 of the 4-step first schedule), blocks 1-2: 2 forwards (exit 1); commit after each
    kinds = [k for k, _ in grad_modes]
    assert kinds == ["v", "v", "v", "commit", "v", "v", "commit", "v", "v", "commit"]
    with_grad = [i for i, (k, g) in enumerate(grad_modes) if g and k == "v"]
    assert with_grad == [2, 5, 8]
    assert cache.num_frames == 3 and not cache.k[0].requires_grad  # context is built without grad
    assert video.requires_grad
    video.sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    with pytest.raises(ValueError, match="outside the 2-step schedule"):
        few_step(model, torch.randn(1, 1, 3, 8, 8), sig[:2], cond, exit_step=2)
