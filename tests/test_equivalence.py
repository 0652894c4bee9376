"""Design §4: streaming block b with a KV cache of the committed clean blocks < b equals the noisy half of
one teacher-forcing packed forward, to fp32 tolerance, for K=1 and K=3, several frame counts, with and
without a window. Plus the causal structure of each plan, probed by perturbation."""

import pytest
import torch

from framecast.models.attention import AttentionPlan

ATOL = 2e-5


def stream_tf(net, x, sigma, clean, text, plan, offset=0):
    """Block by block: denoise block b reading the cache, then commit its clean copy (method.md §3.4); frame f
    at absolute position offset + f."""
    cache_kw = dict(block_size=plan.block_size, window=plan.window, sink=plan.sink)
    from framecast.models.kv_cache import KVCache

    cache = KVCache(len(net.blocks), **cache_kw)
    outs = []
    F = x.shape[1]
    for s in range(0, F, plan.block_size):
        e = min(s + plan.block_size, F)
        pos = torch.arange(s, e) + offset
        outs.append(net(x[:, s:e], sigma[:, s:e], text, cache=cache, positions=pos))
        net(clean[:, s:e], torch.zeros_like(sigma[:, s:e]), text, cache=cache, commit=True, positions=pos)
    return torch.cat(outs, dim=1), cache


CASES = [  # (K, F, window, sink)
    (1, 1, 0, 0), (1, 4, 0, 0), (1, 7, 0, 0), (3, 3, 0, 0), (3, 7, 0, 0), (3, 9, 0, 0),
    (1, 8, 3, 0), (1, 8, 3, 1), (3, 10, 6, 0), (3, 10, 6, 2), (2, 9, 4, 1),
]


@pytest.mark.parametrize("K, F, window, sink", CASES)
def test_streaming_equals_packed_teacher_forcing(tiny_model, K, F, window, sink):
    net = tiny_model.net
    plan = AttentionPlan("teacher_forcing", K, window, sink)
    B = 2
    x, clean = torch.randn(B, F, 3, 8, 12), torch.randn(B, F, 3, 8, 12)
    sigma = torch.rand(B, F)
    text = torch.randn(B, 5, net.config.text_dim)
    with torch.no_grad():
        packed = net(x, sigma, text, plan=plan, clean=clean)
        streamed, cache = stream_tf(net, x, sigma, clean, text, plan)
    torch.testing.assert_close(streamed, packed, atol=ATOL, rtol=0)
    if window:  # bounded memory: the next block would see exactly (window - K) recent frames + sinks
        assert cache.num_frames <= window - K + sink


class LeakyPlan(AttentionPlan):
    """A broken teacher-forcing mask that lets a noisy block see its own clean copy (method.md §12.9)."""

    def allowed(self, qf, qc, kf, kc):
        ok = super().allowed(qf, qc, kf, kc)
        K = self.block_size
        return ok | (~qc & kc & (kf // K == qf // K))


@pytest.mark.parametrize("K", [1, 3])
def test_equivalence_test_catches_a_leaking_mask(tiny_model, K):
    """The equivalence above must fail if the mask leaks the answer, or it proves nothing."""
    net = tiny_model.net
    F, B = 6, 1
    x, clean, sigma = torch.randn(B, F, 3, 8, 8), torch.randn(B, F, 3, 8, 8), torch.rand(B, F)
    text = torch.randn(B, 5, net.config.text_dim)
    good, leaky = AttentionPlan("teacher_forcing", K), LeakyPlan("teacher_forcing", K)
    with torch.no_grad():
        streamed, _ = stream_tf(net, x, sigma, clean, text, good)
        leaked = net(x, sigma, text, plan=leaky, clean=clean)
    assert (streamed - leaked).abs().max() > 1e3 * ATOL


def _perturb_effect(net, plan, F, frame, *, clean_copy=False):
    """Max change of each output frame when input frame `frame` (of x or of the clean copy) changes."""
    B = 1
    x, clean, sigma = torch.randn(B, F, 3, 8, 8), torch.randn(B, F, 3, 8, 8), torch.rand(B, F)
    text = torch.randn(B, 5, net.config.text_dim)
    kw = dict(plan=plan, clean=clean) if plan.kind == "teacher_forcing" else dict(plan=plan)
    with torch.no_grad():
        a = net(x, sigma, text, **kw)
        if clean_copy:
            clean2 = clean.clone()
            clean2[:, frame] += 1
            kw["clean"] = clean2
            b = net(x, sigma, text, **kw)
        else:
            x2 = x.clone()
            x2[:, frame] += 1
            b = net(x2, sigma, text, **kw)
    return (a - b).abs().amax(dim=(0, 2, 3, 4))  # [F]


def test_plan_structures(tiny_model):
    net = tiny_model.net
    F = 6
    # bidirectional: a late frame changes every output
    eff = _perturb_effect(net, AttentionPlan("bidirectional"), F, 5)
    assert bool((eff > 1e-4).all())
    # block-causal K=2: frame 3 (block 1) changes blocks >= 1 only, including its block-mate frame 2
    eff = _perturb_effect(net, AttentionPlan("block_causal", 2), F, 3)
    assert bool((eff[:2] == 0).all()) and bool((eff[2:] > 1e-4).all())
    # teacher forcing K=2: a noisy frame only affects its own block; blocks never see other noisy blocks
    eff = _perturb_effect(net, AttentionPlan("teacher_forcing", 2), F, 3)
    assert bool((eff[[0, 1, 4, 5]] == 0).all()) and bool((eff[2:4] > 1e-4).all())
    # teacher forcing: the clean copy of block 1 conditions later blocks but never its own noisy twin
    eff = _perturb_effect(net, AttentionPlan("teacher_forcing", 2), F, 2, clean_copy=True)
    assert bool((eff[:4] == 0).all()) and bool((eff[4:] > 1e-4).all())
    # window: with window 2 (K=1) frame 0 drops out of direct view for frames >= 2; it still reaches frame 2
    # through clean frame 1's keys (one hop per layer), but never beyond the 2-layer receptive field
    eff = _perturb_effect(net, AttentionPlan("teacher_forcing", 1, window=2), F, 0, clean_copy=True)
    assert eff[1] > 1e-4 and bool((eff[3:] == 0).all())
    # ... unless it is a sink frame
    eff = _perturb_effect(net, AttentionPlan("teacher_forcing", 1, window=2, sink=1), F, 0, clean_copy=True)
    assert bool((eff[1:] > 1e-4).all())


def test_dense_mask_is_none_when_trivial():
    assert AttentionPlan("bidirectional").dense_mask(4, 16) is None
    assert AttentionPlan("block_causal", 4).dense_mask(4, 16) is None  # one block: full attention
    m = AttentionPlan("teacher_forcing", 1).dense_mask(3, 2)
    assert m.shape == (12, 12)


def test_plan_validation():
    with pytest.raises(ValueError, match="unknown attention plan"):
        AttentionPlan("sideways")
    with pytest.raises(ValueError, match="window"):
        AttentionPlan("block_causal", 3, window=2)


@pytest.mark.parametrize("plan", [AttentionPlan("teacher_forcing", 1), AttentionPlan("block_causal", 2),
                                  AttentionPlan("teacher_forcing", 1, window=2, sink=1)])
def test_flex_block_mask_equals_dense_mask(tiny_model, plan):
    """The opt-in flex path (CUDA) realises the same rule; its forward also runs (eagerly) on CPU."""
    import warnings

    net = tiny_model.net
    x, clean, sigma = torch.randn(1, 4, 3, 8, 8), torch.randn(1, 4, 3, 8, 8), torch.rand(1, 4)
    text = torch.randn(1, 4, net.config.text_dim)
    kw = dict(clean=clean) if plan.kind == "teacher_forcing" else {}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eager flex on CPU warns that it materialises the scores
        dense = net(x, sigma, text, plan=plan, **kw)
        net.attention_backend = "flex"
        try:
            flex = net(x, sigma, text, plan=plan, **kw)
        finally:
            net.attention_backend = "sdpa"
    torch.testing.assert_close(flex, dense, atol=2e-5, rtol=0)


def test_rolling_window_stream_is_translation_invariant(tiny_model):
    """Long play (docs/world_model.md, "Long play"): RoPE makes attention depend on frame distances only and the
    window bounds them, so a stream under a rolling window without sinks is the same stream at any absolute
    position: started at frame 10**6 it gives the frames it gives at 0, and frame 1000 of a session meets no
    distance training did not (a sink's distance would grow: the play server streams without one)."""
    net = tiny_model.net
    W, F, B = 3, 12, 1
    x, clean = torch.randn(B, F, 3, 8, 12), torch.randn(B, F, 3, 8, 12)
    sigma = torch.rand(B, F)
    text = torch.randn(B, 5, net.config.text_dim)
    plan = AttentionPlan("teacher_forcing", 1, W, 0)
    with torch.no_grad():
        at0, c0 = stream_tf(net, x, sigma, clean, text, plan)
        far, c1 = stream_tf(net, x, sigma, clean, text, plan, offset=10**6)
        torch.testing.assert_close(far, at0, atol=ATOL, rtol=0)
        assert c1.frames.tolist() == [f + 10**6 for f in c0.frames.tolist()] and c0.num_frames == W - 1
        packed = net(x, sigma, text, plan=plan, clean=clean, positions=torch.arange(F) + 10**6)
        torch.testing.assert_close(packed, at0, atol=ATOL, rtol=0)
        assert (net(x, sigma, text, plan=AttentionPlan("teacher_forcing", 1, 0, 0), clean=clean) - at0).abs().max() > 1e-3


def test_spatial_embed_keeps_streaming_equal_to_packed_and_starts_as_the_network_without_it(tmp_path):
    """model.spatial_embed (an absolute (row, column) embedding per token): cached == packed still holds with it
    on; zero-initialised, a network with it loaded from a checkpoint without it computes exactly that network;
    and its (row, column) codes are distinct, so it can tell positions apart."""
    from framecast import config as C
    from framecast.generate import build_denoiser
    from framecast.models.backbone import spatial_features
    from framecast.train import checkpoint as ckpt
    from framecast.train.distributed import SINGLE
    from framecast.train.sharded_load import load_into

    from .conftest import randomise

    net = randomise(build_denoiser(C.model_preset("tiny", spatial_embed=True))).eval().net
    plan = AttentionPlan("teacher_forcing", 1, 3, 1)
    x, clean, sigma = torch.randn(2, 5, 3, 8, 12), torch.randn(2, 5, 3, 8, 12), torch.rand(2, 5)
    text = torch.randn(2, 5, net.config.text_dim)
    with torch.no_grad():
        packed = net(x, sigma, text, plan=plan, clean=clean)
        streamed, _ = stream_tf(net, x, sigma, clean, text, plan)
        torch.testing.assert_close(streamed, packed, atol=ATOL, rtol=0)
        net.spatial_embed.weight.zero_(), net.spatial_embed.bias.zero_()
        assert (net(x, sigma, text, plan=plan, clean=clean) - packed).abs().max() > 1e-3  # it was in use
    plain = randomise(build_denoiser(C.model_preset("tiny"))).eval()
    ckpt.save(tmp_path / "plain", 1, weights={"model": plain.state_dict()}, meta={"stage": "stage1"})
    spatial = build_denoiser(C.model_preset("tiny", spatial_embed=True)).eval()
    assert spatial.net.spatial_embed.weight.abs().max() == 0  # zero-initialised
    load_into(spatial, tmp_path / "plain", SINGLE)
    with torch.no_grad():
        torch.testing.assert_close(spatial.net(x, sigma, text, plan=plan, clean=clean),
                                   plain.net(x, sigma, text, plan=plan, clean=clean), atol=1e-6, rtol=0)
    codes = spatial_features(8, 8)  # [64, 32]
    assert codes.shape == (64, 32) and torch.cdist(codes, codes).add(torch.eye(64)).min() > 0.1


def test_action_tokens_keep_streaming_equal_to_packed_and_start_as_the_network_without_them(tmp_path):
    """model.action_tokens (one vector per action and token position, added to the frame's tokens): through the
    Denoiser with per-frame actions, cached == packed holds; zero-initialised, a network with it loaded from a
    checkpoint without it computes exactly that network; a frame of another token count is refused by name."""
    from framecast import config as C
    from framecast.generate import build_denoiser
    from framecast.models.conditioning import Cond
    from framecast.train import checkpoint as ckpt
    from framecast.train.distributed import SINGLE
    from framecast.train.sharded_load import load_into

    from .conftest import randomise

    mc = C.model_preset("tiny", num_actions=3, action_tokens=6)  # 8x12 frames, patch 4: 2x3 = 6 tokens
    model = randomise(build_denoiser(mc)).eval()
    assert model.action_embed.tokens.shape == (4, 6, mc.dim)
    plan = AttentionPlan("teacher_forcing", 1, 3, 0)
    B, F = 2, 5
    x, clean, sigma = torch.randn(B, F, 3, 8, 12), torch.randn(B, F, 3, 8, 12), torch.rand(B, F)
    cond = Cond(torch.randn(B, 5, mc.text_dim), torch.randint(0, 4, (B, F)))
    with torch.no_grad():
        packed = model.velocity(x, sigma, cond, plan=plan, clean=clean)
        cache, outs = model.new_cache(window=3), []
        for f in range(F):
            pos, c = torch.arange(f, f + 1), cond.frames(f, f + 1)
            outs.append(model.velocity(x[:, f:f + 1], sigma[:, f:f + 1], c, cache=cache, positions=pos))
            model.commit(clean[:, f:f + 1], c, cache, positions=pos)
        torch.testing.assert_close(torch.cat(outs, dim=1), packed, atol=ATOL, rtol=0)
        swapped = Cond(cond.text, cond.actions.roll(1, dims=0))
        model.action_embed.table.weight.zero_()  # only the token route tells the actions apart now
        assert (model.velocity(x, sigma, swapped, plan=plan, clean=clean)
                - model.velocity(x, sigma, cond, plan=plan, clean=clean)).abs().max() > 1e-3
        with pytest.raises(ValueError, match="model.action_tokens must be 4"):
            model.velocity(x[..., :8], sigma, cond, plan=plan, clean=clean[..., :8])  # 8x8: 2x2 tokens
    plain = randomise(build_denoiser(C.model_preset("tiny", num_actions=3))).eval()
    ckpt.save(tmp_path / "plain", 1, weights={"model": plain.state_dict()}, meta={"stage": "stage1"})
    grown = build_denoiser(mc).eval()
    assert grown.action_embed.tokens.abs().max() == 0  # zero-initialised
    load_into(grown, tmp_path / "plain", SINGLE)
    with torch.no_grad():
        torch.testing.assert_close(grown.velocity(x, sigma, cond, plan=plan, clean=clean),
                                   plain.velocity(x, sigma, cond, plan=plan, clean=clean), atol=1e-6, rtol=0)
    with pytest.raises(C.ConfigError, match="action_tokens needs actions"):
        build_denoiser(C.model_preset("tiny", action_tokens=6))
