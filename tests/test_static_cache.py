"""StaticKVCache (the opt-in fast path, kv_cache.py): preallocated ring buffers with KVCache's interface and
eviction rule. A stream through it gives the same frames as through KVCache (architecture.md §4 then holds
for it too): bit for bit in frame order, to float summation order in ring order; its buffers never grow and
are reused in place; and the steady-state step has static shapes, so torch.compile captures it once."""

import pytest
import torch

from framecast import flow
from framecast.models.conditioning import Cond
from framecast.models.denoiser import Denoiser, Guidance
from framecast.models.kv_cache import KVCache, StaticKVCache
from framecast.rollout import generate, rollout
from framecast.sampling import few_step

RING_ATOL = 2e-5  # ring order only reorders the keys of an unmasked softmax: float summation order (measured ~2e-6)
SIGMAS = flow.few_step_sigmas([1000, 500], 5.0).float()  # 2-step frame-wise / chunk-wise student
FIRST = flow.few_step_sigmas([1000, 750, 500, 250], 5.0).float()  # the first block's 4 steps (method.md §7.6)

# (K, window, sink, F): the rolling part holds window - K frames, so F wraps the ring 4-6 times
CASES = [(1, 4, 1, 20), (3, 9, 2, 30), (1, 3, 0, 12), (2, 5, 1, 17)]


def _stream(model, cache, noise, cond, K, guidance=None, **kw):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        return generate(model, noise, cond, sampler=few_step, sigmas=SIGMAS, first_sigmas=FIRST, block_size=K,
                        cache=cache, guidance=guidance, generator=g, **kw)


@pytest.mark.parametrize("K, window, sink, F", CASES)
def test_static_stream_equals_kv_cache(tiny_model, one_thread, K, window, sink, F):
    noise, cond = torch.randn(1, F, 3, 8, 12), Cond(torch.randn(1, 5, 32))  # [B, F, C, H, W]
    ref_cache = tiny_model.new_cache(block_size=K, window=window, sink=sink)
    ref = _stream(tiny_model, ref_cache, noise, cond, K)
    for order in StaticKVCache.ORDERS:
        cache = tiny_model.new_cache(block_size=K, window=window, sink=sink, static=True, order=order)
        out = _stream(tiny_model, cache, noise, cond, K)
        if order == "frame":
            assert torch.equal(out, ref), (out - ref).abs().max()  # exact: the same tensors reach every kernel
        else:
            torch.testing.assert_close(out, ref, atol=RING_ATOL, rtol=0)
        assert cache.frames.tolist() == ref_cache.frames.tolist() and cache.end == ref_cache.end
        assert cache.num_frames == window - K + sink  # full: the ring wrapped (F > sink + window)


def test_static_stream_with_guidance_prefix_and_prompt_switch(tiny_model, one_thread):
    """CFG (batch 2B, a new text tensor every forward: the by-value prompt check), a clean prefix, and a
    prompt switch half way through the stream, which must recompute the text K/V."""
    K, window, sink = 1, 4, 1
    noise, ctx = torch.randn(1, 12, 3, 8, 12), torch.randn(1, 2, 3, 8, 12)
    a, b = Cond(torch.randn(1, 5, 32)), Cond(torch.randn(1, 5, 32))
    guidance = Guidance(3.0, Cond(torch.zeros(1, 5, 32)))
    outs = []
    for cache in (KVCache(2, block_size=K, window=window, sink=sink),
                  StaticKVCache(2, block_size=K, window=window, sink=sink)):
        first = _stream(tiny_model, cache, noise[:, :6], a, K, guidance, context=ctx, commit_last=True)
        second = _stream(tiny_model, cache, noise[:, 6:], b, K, guidance)
        outs.append(torch.cat([first, second], 1))
    assert torch.equal(outs[1], outs[0])
    with torch.no_grad():  # a switch on the same cache really changes the output (text K/V recomputed)
        cache = StaticKVCache(2, block_size=K, window=window, sink=sink)
        x_a = tiny_model.x0(noise[:, :1], torch.ones(1, 1), a, cache=cache)
        x_b = tiny_model.x0(noise[:, :1], torch.ones(1, 1), b, cache=cache)
        ref_b = tiny_model.x0(noise[:, :1], torch.ones(1, 1), b)
    assert not torch.equal(x_a, x_b) and torch.equal(x_b, ref_b)


def test_unbounded_static_cache_with_max_frames(tiny_model, one_thread):
    noise, cond = torch.randn(1, 7, 3, 8, 8), Cond(torch.randn(1, 5, 32))
    ref = _stream(tiny_model, tiny_model.new_cache(block_size=3), noise, cond, 3)
    cache = tiny_model.new_cache(block_size=3, static=True, max_frames=7)
    assert torch.equal(_stream(tiny_model, cache, noise, cond, 3, commit_last=True), ref)
    assert cache.frames.tolist() == list(range(7))
    with pytest.raises(ValueError, match="full"):
        _stream(tiny_model, cache, noise[:, :1], cond, 1, commit_last=True)


def _commit(cache, frames, tokens=4, B=1, H=2, D=3):
    """Stage K = V = the frame index of each token, in every layer, then commit (as tests/test_kv_cache.py)."""
    f = torch.tensor(frames, dtype=torch.float32).repeat_interleave(tokens)  # [n*T]
    kv = f[None, :, None, None].expand(B, -1, H, D).contiguous()  # [B, n*T, H, D]
    for layer in range(cache.num_layers):
        cache.stage(layer, kv, kv.clone())
    cache.commit(torch.tensor(frames))


@pytest.mark.parametrize("K, window, sink", [(1, 3, 1), (3, 9, 2), (2, 5, 0)])
def test_buffers_are_preallocated_bounded_and_reused(K, window, sink):
    dyn = KVCache(2, block_size=K, window=window, sink=sink)
    frame, ring = (StaticKVCache(2, block_size=K, window=window, sink=sink, order=o) for o in ("frame", "ring"))
    ptrs, sizes, lengths = set(), set(), []
    for s in range(0, 14 * K, K):
        block = list(range(s, s + K))
        for c in (dyn, frame, ring):
            _commit(c, block)
        assert frame.frames.tolist() == ring.frames.tolist() == dyn.frames.tolist()  # the same eviction
        for layer in range(2):
            ref = dyn.context(layer)[0]
            assert torch.equal(frame.context(layer)[0], ref)  # frame order: KVCache's context exactly
            got = ring.context(layer)[0]  # ring order: the same frames, rotated
            assert sorted(got[0, ::4, 0, 0].tolist()) == ref[0, ::4, 0, 0].tolist()
        ptrs.add(tuple(t.data_ptr() for c in (frame, ring) for t in c.k + c.v))
        sizes.add((frame.memory_bytes(), ring.memory_bytes()))
        lengths.append(frame.context(0)[0].shape[1])
    assert len(ptrs) == 1 and len(sizes) == 1  # allocated once, written in place
    assert frame.k[0].shape[1] == (sink + window - K) * 4  # room for sink + window - K frames, never more
    full = lengths.index(max(lengths))
    assert set(lengths[full:]) == {(sink + window - K) * 4}  # constant once the window is full
    assert ring.context(0)[0].data_ptr() == ring.k[0].data_ptr()  # ring order: a view, no copy
    ring.reset()
    assert ring.context(0) == (None, None) and ring.end == 0 and ring.num_frames == 0
    _commit(ring, [0])
    assert ring.k[0].data_ptr() in ptrs.pop()  # reset keeps the buffers


def test_static_cache_errors():
    with pytest.raises(ValueError, match="window > 0 or"):
        StaticKVCache(1)
    with pytest.raises(ValueError, match="at least one block"):
        StaticKVCache(1, block_size=3, window=2)
    with pytest.raises(ValueError, match="order"):
        StaticKVCache(1, window=2, order="sideways")
    # staging / overlap / tokens-per-frame errors: tests/test_kv_cache.py::test_commit_errors, for both caches


def _compile_or_skip(backend):
    try:
        torch.compile(lambda t: t + 1, backend=backend)(torch.zeros(1))
    except Exception as e:  # noqa: BLE001 - any failure means this torch cannot compile here
        pytest.skip(f"torch.compile is unavailable here ({type(e).__name__}: {e})")


def test_steady_state_step_compiles_once_and_gives_the_same_frames(tiny_model, one_thread):
    """The per-block denoise + commit step of a full-window stream has static shapes: after the first
    compiled block nothing recompiles, and the frames equal the eager stream's (architecture.md §4)."""
    import torch._dynamo

    graphs = []

    def backend(gm, example_inputs):  # torch.compile's "eager" backend, counting the graphs it is handed
        graphs.append(gm)
        return gm.forward

    _compile_or_skip(backend)
    K, window, sink, F, warm = 3, 9, 2, 27, 9
    noise, cond = torch.randn(1, F, 3, 8, 12), Cond(torch.randn(1, 5, 32))
    ref = _stream(tiny_model, tiny_model.new_cache(block_size=K, window=window, sink=sink, static=True),
                  noise, cond, K)
    torch._dynamo.reset()
    compiled = Denoiser(torch.compile(tiny_model.net, backend=backend, dynamic=False))
    cache, g = tiny_model.new_cache(block_size=K, window=window, sink=sink, static=True), torch.Generator()
    g.manual_seed(0)
    kw = dict(sampler=few_step, sigmas=SIGMAS, block_size=K, cache=cache, generator=g, commit_last=True)
    outs, counts, lengths = [], [], []
    try:
        with torch.no_grad():  # the window fills eagerly; the steady state runs compiled
            outs += [b.x0 for b in rollout(tiny_model, noise[:, :warm], cond, first_sigmas=FIRST, **kw)]
            for s in range(warm, F, K):
                outs += [b.x0 for b in rollout(compiled, noise[:, s:s + K], cond, **kw)]
                counts.append(len(graphs))
                lengths.append(cache.context(0)[0].shape[1])
    finally:
        torch._dynamo.reset()
    assert torch.equal(torch.cat(outs, 1), ref)
    assert counts[0] > 0 and set(counts) == {counts[0]}, counts  # compiled in the first block, never again
    assert set(lengths) == {(sink + window - K) * cache.tokens_per_frame}  # static context length
