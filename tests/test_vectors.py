"""Vector videos and analytic teachers (framecast/data/vectors.py; method.md §9.2 Toy A)."""

import pytest
import torch
from torch.distributions import Categorical, Independent, MixtureSameFamily, Normal

from framecast import flow
from framecast.data.vectors import (
    ARTeacher,
    BidirectionalTeacher,
    ContextCache,
    VectorMixture,
    VectorSource,
    flow_map,
)
from framecast.models.attention import AttentionPlan
from framecast.models.conditioning import Cond
from framecast.models.denoiser import Guidance
from framecast.rollout import generate
from framecast.sampling import euler, few_step

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: threads only add sync cost

f64 = torch.float64




@pytest.fixture
def mix() -> VectorMixture:
    """Generic means and unequal weights, so nothing relies on the +-1 structure or symmetry."""
    g = torch.Generator().manual_seed(7)
    means = torch.randn(5, 4, 3, generator=g, dtype=f64)  # [M, F, D]
    weights = torch.softmax(torch.randn(5, generator=g, dtype=f64), 0)
    return VectorMixture(means, weights, std=0.4)


def noisy_marginal(mix, n, sigma, g):
    """x_s drawn from the noisy marginal at per-frame sigma [n, F] (responsibilities are then non-trivial)."""
    x0, _ = mix.sample(n, g)
    return flow.add_noise(x0.to(f64), torch.randn(x0.shape, generator=g, dtype=f64), sigma)


def log_p_noisy(x, sigma, means, log_w, std):
    """Exact log density [B] of noisy frames x [B, F, D] at sigma [B, F]: sum_k w_k prod_f N((1-s)m, var)."""
    a = (1 - sigma)[:, None, :, None]  # [B, 1, F, 1]
    scale = (a ** 2 * std ** 2 + sigma[:, None, :, None] ** 2).sqrt()
    comp = Normal(a * means[None], scale).log_prob(x[:, None]).sum((2, 3))  # [B, M]
    return torch.logsumexp(log_w + comp, dim=-1)


def tweedie_x0(x, sigma, means, log_w, std):
    """E[x0 | x_s] = (x_s + s^2 grad log p_s(x_s)) / (1 - s), by autograd."""
    x = x.detach().requires_grad_(True)
    (score,) = torch.autograd.grad(log_p_noisy(x, sigma, means, log_w, std).sum(), x)
    s = sigma[..., None]
    return (x + s ** 2 * score) / (1 - s)


# ------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------


def test_sample_shapes_determinism_and_component_means(mix):
    x, k = mix.sample(6000, torch.Generator().manual_seed(0))
    assert x.shape == (6000, 4, 3, 1, 1) and x.dtype == torch.float32
    assert k.shape == (6000,) and k.dtype == torch.long
    x2, k2 = mix.sample(6000, torch.Generator().manual_seed(0))
    assert torch.equal(x, x2) and torch.equal(k, k2)
    assert not torch.equal(x, mix.sample(6000, torch.Generator().manual_seed(1))[0])
    freq = torch.bincount(k, minlength=5).to(f64) / 6000
    assert torch.allclose(freq, mix.weights, atol=0.03)
    for c in range(5):
        xc = x[k == c, ..., 0, 0].to(f64)  # [n_c, F, D]
        assert torch.allclose(xc.mean(0), mix.means[c], atol=5 * 0.4 / len(xc) ** 0.5)
        assert abs(float((xc - mix.means[c]).std()) - 0.4) < 0.03


def test_presets():
    a = VectorMixture.toy_a(num_frames=3, dim=2, mu=1.5, std=0.05)
    assert a.means.shape == (2, 3, 2) and a.num_frames == 3 and a.dim == 2
    assert torch.equal(a.means[0], torch.full((3, 2), 1.5, dtype=f64)) and torch.equal(a.means[1], -a.means[0])
    assert a.weights.tolist() == [0.5, 0.5]
    r = VectorMixture.random(num_frames=5, dim=2, num_components=4, std=0.1, seed=3)
    assert r.means.shape == (4, 5, 2) and set(r.means.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(r.means, VectorMixture.random(5, 2, 4, 0.1, seed=3).means)
    assert not torch.equal(r.means, VectorMixture.random(5, 2, 4, 0.1, seed=4).means)
    with pytest.raises(ValueError):
        VectorMixture(r.means, torch.tensor([0.5, 0.5, 0.5, 0.5]), 0.1)


def test_log_prob_matches_torch_distributions(mix):
    x, _ = mix.sample(50, torch.Generator().manual_seed(2))
    ref = MixtureSameFamily(Categorical(mix.weights), Independent(Normal(mix.means, mix.std), 2))
    assert torch.allclose(mix.log_prob(x), ref.log_prob(x[..., 0, 0].to(f64)), atol=1e-9)


def test_vector_source_batch():
    src = VectorSource(VectorMixture.toy_a(), text_dim=8, text_tokens=2)
    b = src.batch(5, torch.Generator().manual_seed(0))
    assert b.video.shape == (5, 2, 1, 1, 1) and b.cond.text.shape == (5, 2, 8)
    assert not b.cond.text.any() and not b.null.text.any() and b.captions == [""] * 5
    assert torch.equal(b.video, src.batch(5, torch.Generator().manual_seed(0)).video)


# ------------------------------------------------------------------------------------------------
# Teachers: exact posterior means
# ------------------------------------------------------------------------------------------------


def test_bidirectional_posterior_mean_is_tweedie(mix):
    g = torch.Generator().manual_seed(0)
    sigma = 0.05 + 0.9 * torch.rand(64, 4, generator=g, dtype=f64)  # [B, F], one sigma per frame
    x = noisy_marginal(mix, 64, sigma, g)
    x0 = BidirectionalTeacher(mix).x0(x, sigma, None)
    ref = tweedie_x0(x[..., 0, 0], sigma, mix.means, mix.weights.log(), mix.std)
    assert torch.allclose(x0[..., 0, 0], ref, atol=1e-5)
    # a subset of frames at explicit positions: the joint posterior of just those frames
    pos = torch.tensor([3, 1])
    x0 = BidirectionalTeacher(mix).x0(x[:, [3, 1]], sigma[:, [3, 1]], None, positions=pos)
    ref = tweedie_x0(x[:, [3, 1], :, 0, 0], sigma[:, [3, 1]], mix.means[:, pos], mix.weights.log(), mix.std)
    assert torch.allclose(x0[..., 0, 0], ref, atol=1e-5)


def test_ar_posterior_mean_given_cache_is_tweedie(mix):
    g = torch.Generator().manual_seed(1)
    clean, _ = mix.sample(64, g)
    clean = clean.to(f64)
    teacher = ARTeacher(mix)
    cache = teacher.new_cache(block_size=2)
    teacher.commit(clean[:, :2], None, cache)  # context: clean frames 0, 1
    assert cache.num_frames == 2 and cache.end == 2 and cache.frames.tolist() == [0, 1]
    sigma = 0.05 + 0.9 * torch.rand(64, 2, generator=g, dtype=f64)
    x = flow.add_noise(clean[:, 2:], torch.randn(64, 2, 3, 1, 1, generator=g, dtype=f64), sigma)
    x0 = teacher.x0(x, sigma, None, cache=cache)  # positions default to cache.end + arange = [2, 3]
    # the block's density given the context: a mixture with the context posterior as its weights
    ctx_lik = Normal(mix.means[None, :, :2], mix.std).log_prob(clean[:, None, :2, :, 0, 0]).sum((2, 3))  # [B, M]
    log_w = torch.log_softmax(mix.weights.log() + ctx_lik, dim=-1)
    ref = tweedie_x0(x[..., 0, 0], sigma, mix.means[:, 2:], log_w, mix.std)
    assert torch.allclose(x0[..., 0, 0], ref, atol=1e-5)
    # and the context matters (otherwise this test could not tell the teachers apart)
    assert (x0 - teacher.x0(x, sigma, None, positions=torch.tensor([2, 3]))).abs().max() > 1e-2


def test_velocity_finite_at_sigma_zero_and_one(mix):
    x, _ = mix.sample(8, torch.Generator().manual_seed(3))
    for teacher in (BidirectionalTeacher(mix), ARTeacher(mix)):
        v0 = teacher.velocity(x, torch.zeros(8, 4), None)
        assert torch.isfinite(v0).all() and torch.allclose(teacher.x0(x, torch.zeros(8, 4), None), x)
        # at s = 0, v = E[eps - x0 | x0 = x] = -x (the continuous limit, not a 0/0)
        assert torch.allclose(v0, -x, atol=1e-6)
        assert torch.isfinite(teacher.velocity(x, torch.ones(8, 4), None)).all()


@pytest.mark.parametrize("K", [1, 2])
def test_ar_packed_equals_streaming(mix, K):
    g = torch.Generator().manual_seed(4)
    clean, _ = mix.sample(16, g)
    sigma = torch.rand(16, 4, generator=g)  # independent per frame, as in TF training
    x = flow.add_noise(clean, torch.randn(clean.shape, generator=g), sigma)
    teacher = ARTeacher(mix)
    packed = teacher.velocity(x, sigma, None, plan=AttentionPlan("teacher_forcing", K), clean=clean)
    cache, streamed = teacher.new_cache(block_size=K), []
    for b in range(0, 4, K):
        streamed.append(teacher.velocity(x[:, b:b + K], sigma[:, b:b + K], None, cache=cache))
        teacher.commit(clean[:, b:b + K], None, cache)
    assert torch.allclose(packed, torch.cat(streamed, 1), atol=1e-6)
    # frames after the first block must differ from the context-free marginal velocity
    marginal = ARTeacher(mix).velocity(x[:, K:], sigma[:, K:], None, positions=torch.arange(K, 4))
    assert (packed[:, K:] - marginal).abs().max() > 1e-2
    # flow_map forwards the packed-mode kwargs: the last block's flow equals its streamed flow
    eps = torch.randn(clean.shape, generator=g, dtype=f64)
    full = flow_map(teacher, eps, 1.0, steps=20, clean=clean, plan=AttentionPlan("teacher_forcing", K))
    cache = teacher.new_cache(block_size=K)
    teacher.commit(clean[:, :4 - K], None, cache)
    assert torch.allclose(full[:, 4 - K:], flow_map(teacher, eps[:, 4 - K:], 1.0, steps=20, cache=cache), atol=1e-9)


# ------------------------------------------------------------------------------------------------
# Toy A (method.md §9.2): the AR teacher is fine, the bidirectional flow's per-frame conditional expectation blurs
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def toy():
    return VectorMixture.toy_a()


def _sign_agreement(x):
    return float((x[:, 0].sign() == x[:, 1].sign()).double().mean())


def test_toy_a_sampling(toy):
    n = 2000
    noise = torch.randn(n, 2, 1, 1, 1, generator=torch.Generator().manual_seed(0))
    cond = Cond(torch.zeros(n, 1, 1))
    kw = dict(sampler=euler, sigmas=flow.grid(48, 1.0))
    ar = generate(ARTeacher(toy), noise, cond, block_size=1, **kw)
    assert ar.shape == noise.shape and _sign_agreement(ar) > 0.99
    assert float((ar[:, 0].abs() < 0.5).double().mean()) < 0.01
    joint = generate(BidirectionalTeacher(toy), noise, cond, block_size=2, **kw)
    assert _sign_agreement(joint) > 0.99
    # the bidirectional teacher run frame by frame ignores the committed frame: signs are independent
    blind = generate(BidirectionalTeacher(toy), noise, cond, block_size=1, **kw)
    assert abs(_sign_agreement(blind) - 0.5) < 0.05
    # the analytic teacher also drives the few-step sampler through the rollout
    fs = generate(ARTeacher(toy), noise, cond, block_size=1, sampler=few_step,
                  sigmas=flow.few_step_sigmas([1000, 750, 500, 250], 5.0))
    assert _sign_agreement(fs) > 0.99


def test_toy_a_conditional_expectation_of_bidirectional_flow(toy):
    g = torch.Generator().manual_seed(5)
    eps1 = torch.randn(200, 1, generator=g, dtype=f64).expand(200, 64)
    eps2 = torch.randn(200, 64, generator=g, dtype=f64)
    eps = torch.stack([eps1, eps2], -1).reshape(-1, 2, 1, 1, 1)  # [200 * 64, 2, 1, 1, 1]
    out = flow_map(BidirectionalTeacher(toy), eps, 1.0, steps=100)[..., 0, 0, 0]  # [12800, 2]
    # the joint flow picks s = sign(eps1 + eps2) ...
    assert float((out[:, 0].sign() == eps.sum(1).flatten().sign()).double().mean()) > 0.99
    # ... so the best an AR student can do from eps1 alone is E[x0^1 | eps1] = mu (2 Phi(eps1) - 1), mostly near 0
    cond_mean = out[:, 0].reshape(200, 64).mean(1)  # [200]
    mass = float((cond_mean.abs() < 0.5).double().mean())
    assert mass > 0.3, mass
    # the AR teacher's frame-1 flow map is a function of eps1 alone and stays bimodal
    ar = flow_map(ARTeacher(toy), eps[::64, :1], 1.0, steps=100)
    assert float((ar.abs() < 0.5).double().mean()) < 0.01


def test_flow_map_rk4_matches_closed_form_for_one_gaussian():
    """One Gaussian component: the exact flow maps eps at sigma = 1 to x0 = m + std * eps."""
    single = VectorMixture(torch.tensor([[[0.3, -1.2]]]), torch.tensor([1.0]), std=0.5)
    eps = torch.randn(10, 1, 2, 1, 1, dtype=f64)
    x0 = flow_map(BidirectionalTeacher(single), eps, 1.0, steps=50)
    assert torch.allclose(x0, single.means[0][None, ..., None, None] + 0.5 * eps, atol=1e-8)


# ------------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------------


def test_errors(toy):
    x = torch.randn(3, 2, 1, 1, 1)
    cond = Cond(torch.zeros(3, 1, 1))
    for teacher in (BidirectionalTeacher(toy), ARTeacher(toy)):
        with pytest.raises(ValueError, match="unconditional"):
            teacher.velocity(x, torch.rand(3, 2), cond, guidance=Guidance(3.0, cond))
        teacher.velocity(x, torch.rand(3, 2), cond, guidance=Guidance(1.0, cond))  # scale 1 is a no-op
        with pytest.raises(ValueError, match="unconditional"):
            teacher.commit(x, cond, teacher.new_cache(), guidance=Guidance(2.0, cond))
        with pytest.raises(ValueError, match="outside"):  # 3 frames of a 2-frame mixture
            teacher.velocity(torch.randn(3, 3, 1, 1, 1), torch.rand(3, 3), cond)
        with pytest.raises(ValueError, match="outside"):
            teacher.velocity(x, torch.rand(3, 2), cond, positions=torch.tensor([1, 2]))
        with pytest.raises(ValueError, match="positions"):
            teacher.velocity(x, torch.rand(3, 2), cond, positions=torch.tensor([0]))
        with pytest.raises(ValueError, match=r"\[B, F, 1, 1, 1\]"):
            teacher.velocity(torch.randn(3, 2, 1, 2, 2), torch.rand(3, 2), cond)
        cache = teacher.new_cache()
        teacher.commit(x[:, :1], cond, cache)
        with pytest.raises(ValueError, match="already"):
            teacher.commit(x[:, :1], cond, cache, positions=torch.tensor([0]))
        with pytest.raises(ValueError, match="outside"):  # cache.end = 1, so a 2-frame block overruns
            teacher.velocity(x, torch.rand(3, 2), cond, cache=cache)
    ar = ARTeacher(toy)
    with pytest.raises(ValueError, match="teacher_forcing"):
        ar.velocity(x, torch.rand(3, 2), cond, clean=x)
    with pytest.raises(ValueError, match="not both"):
        ar.velocity(x, torch.rand(3, 2), cond, clean=x, plan=AttentionPlan("teacher_forcing"), cache=ar.new_cache())
    assert isinstance(ar.new_cache(block_size=2, window=4, sink=1), ContextCache)
