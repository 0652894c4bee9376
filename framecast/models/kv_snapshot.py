"""A KV cache's self-attention context frozen as it is now, for gradient-checkpointed cached forwards.

DMD's self-rollout (method.md §7.2) runs each block's exit step with gradients while reading the cache, then
commits the block and moves on. Under `model.gradient_checkpointing` that forward is recomputed in backward,
after later blocks were committed: it must read the context it read the first time. An unbounded `KVCache`
only appends (each commit concatenates new tensors), so the snapshot keeps the context's length and reads a
prefix of the newer tensors (no old copy stays alive); a cache that may evict (a window) or overwrite (the
static ring buffer) is cloned. Equality of the gradients with and without checkpointing:
tests/test_checkpointed_rollout.py.
"""

from __future__ import annotations

import torch

from .kv_cache import KVCache

Tensor = torch.Tensor


class ContextSnapshot:
    def __init__(self, cache) -> None:
        self._cache, self._frames = cache, cache.frames.clone()
        self.num_layers = cache.num_layers
        ctx = [cache.context(i) for i in range(cache.num_layers)]
        self._len = [None if k is None else k.shape[1] for k, _ in ctx]
        append_only = isinstance(cache, KVCache) and not cache.window
        self._ctx = None if append_only else [(k, v) if k is None else (k.clone(), v.clone()) for k, v in ctx]

    def context(self, layer: int) -> tuple[Tensor | None, Tensor | None]:
        if self._ctx is not None:
            return self._ctx[layer]
        n = self._len[layer]
        if n is None:
            return None, None
        now, then = self._cache.frames, self._frames
        if now.numel() < then.numel() or not torch.equal(now[: then.numel()], then):
            raise RuntimeError("the KV cache was reset after a gradient-checkpointed forward read it; run backward "
                               "before resetting it")
        return self._cache.k[layer][:, :n], self._cache.v[layer][:, :n]  # [B, n, H, D]: the context then

    def stage(self, layer: int, k: Tensor, v: Tensor) -> None:
        raise RuntimeError("a context snapshot is read-only: commit forwards are never checkpointed")
