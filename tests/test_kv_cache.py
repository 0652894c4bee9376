import pytest
import torch

from framecast.models.kv_cache import KVCache, StaticKVCache


def _commit(cache, frames, tokens=4, B=1, H=2, D=3):
    n = len(frames) * tokens
    for layer in range(cache.num_layers):
        cache.stage(layer, torch.full((B, n, H, D), float(frames[0])), torch.zeros(B, n, H, D))
    cache.commit(torch.tensor(frames))


def test_window_and_sink_bound_memory():
    cache = KVCache(2, block_size=1, window=3, sink=1)
    sizes = []
    for f in range(20):
        _commit(cache, [f])
        sizes.append(cache.memory_bytes())
        # the next block [f+1, f+2) sees frames >= f+2-3 plus sink frame 0
        assert cache.frames.tolist() == sorted({0, *range(max(0, f - 1), f + 1)})
    assert len(set(sizes[3:])) == 1  # flat once the window is full
    assert cache.end == 20


def test_unbounded_cache_grows_and_reset_forgets():
    cache = KVCache(1)
    for f in range(0, 6, 2):
        _commit(cache, [f, f + 1])
    assert cache.num_frames == 6 and cache.k[0].shape[1] == 6 * 4
    cache.reset()
    assert cache.num_frames == 0 and cache.end == 0 and cache.k[0] is None


@pytest.mark.parametrize("make", [lambda: KVCache(2), lambda: StaticKVCache(2, block_size=2, window=4)],
                         ids=["KVCache", "StaticKVCache"])
def test_commit_errors(make):
    cache = make()
    with pytest.raises(RuntimeError, match="without staged K/V"):
        cache.commit(torch.tensor([0]))
    _commit(cache, [0, 1])
    with pytest.raises(ValueError, match="overlap"):
        _commit(cache, [1])
    with pytest.raises(ValueError, match="tokens per frame"):
        _commit(cache, [2], tokens=5)
    with pytest.raises(ValueError, match="at least one block"):
        KVCache(1, block_size=3, window=2)


def test_cross_attention_cache_is_per_prompt():
    cache = KVCache(1)
    calls = []

    def compute():
        calls.append(1)
        return torch.randn(1, 4, 2, 3), torch.randn(1, 4, 2, 3)

    a, b = torch.randn(1, 4, 8), torch.randn(1, 4, 8)
    k1, _ = cache.cross(0, a, compute)
    k2, _ = cache.cross(0, a.clone(), compute)  # same prompt by value: cached
    assert len(calls) == 1 and k1 is k2
    cache.cross(0, b, compute)  # prompt switch: recomputed
    assert len(calls) == 2
