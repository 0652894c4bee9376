"""KVCache: the committed clean context of a stream, per layer, post-RoPE (method.md §3.4).

Life of a block in streaming (rollout.py owns the order):

1. denoising forwards of block b read `context(layer)` and never write;
2. one commit forward of the clean output (sigma = context noise, usually 0) calls `stage(layer, k, v)` in
   every layer, then `commit(frames)` appends the staged K/V and evicts what the next block may not see.

Eviction uses the attention plan's window rule (attention.py): after committing up to frame E, the next
block [E, E+K) sees frames >= E + K - window plus the first `sink` frames. Memory is therefore bounded
by (window - K + sink) frames for an unbounded stream. Keys are stored after RoPE with absolute frame
positions, so nothing is re-rotated on eviction.

Cross-attention K/V depend only on the prompt; they are cached per prompt (`cross`) and recomputed when
a different text tensor arrives (prompt switch).
"""

from __future__ import annotations

from typing import Callable

import torch

Tensor = torch.Tensor


class CommittedFrames:
    """Position bookkeeping shared by every context store: `frames` holds absolute indices of committed frames."""

    frames: Tensor

    @property
    def num_frames(self) -> int:
        return int(self.frames.numel())

    @property
    def end(self) -> int:
        """One past the last committed frame (the next frame's position); 0 when empty."""
        return int(self.frames.max()) + 1 if self.num_frames else 0


class KVCache(CommittedFrames):
    def __init__(self, num_layers: int, *, block_size: int = 1, window: int = 0, sink: int = 0) -> None:
        if window and window < block_size:
            raise ValueError(f"window ({window} frames) must cover at least one block ({block_size} frames)")
        self.num_layers = num_layers
        self.block_size = block_size
        self.window = window
        self.sink = sink
        self.reset()

    def reset(self) -> None:
        """Forget all context and the cached prompt."""
        L = self.num_layers
        self.k: list[Tensor | None] = [None] * L  # [B, Lc, H, D]
        self.v: list[Tensor | None] = [None] * L
        self.frames = torch.empty(0, dtype=torch.long)  # absolute frame index of each cached frame
        self.tokens_per_frame = 0
        self._staged: list[tuple[Tensor, Tensor] | None] = [None] * L
        self._text: Tensor | None = None
        self._cross: list[tuple[Tensor, Tensor] | None] = [None] * L

    # -- self-attention context -------------------------------------------------------------------

    def context(self, layer: int) -> tuple[Tensor | None, Tensor | None]:
        return self.k[layer], self.v[layer]

    def stage(self, layer: int, k: Tensor, v: Tensor) -> None:
        """Called by a commit forward: the block's clean K/V for `layer` ([B, Lb, H, D], post-RoPE)."""
        self._staged[layer] = (k.detach(), v.detach())  # context is never differentiated (method.md §7.2)

    def commit(self, frames: Tensor) -> None:
        """Append the staged K/V of `frames` (absolute indices) in every layer, then evict."""
        if any(s is None for s in self._staged):
            missing = [i for i, s in enumerate(self._staged) if s is None]
            raise RuntimeError(f"commit without staged K/V for layers {missing}; run a commit forward first")
        frames = frames.detach().cpu().long()
        if self.num_frames and int(frames.min()) < self.end:
            raise ValueError(f"frames {frames.tolist()} overlap the cache, which ends at frame {self.end}")
        tokens = self._staged[0][0].shape[1]
        if tokens % frames.numel():
            raise ValueError(f"{tokens} staged tokens do not split into {frames.numel()} frames")
        tpf = tokens // frames.numel()
        if self.tokens_per_frame and tpf != self.tokens_per_frame:
            raise ValueError(f"block has {tpf} tokens per frame, the cache holds {self.tokens_per_frame}")
        self.tokens_per_frame = tpf
        for i, (k, v) in enumerate(self._staged):
            self.k[i] = k if self.k[i] is None else torch.cat([self.k[i], k], dim=1)
            self.v[i] = v if self.v[i] is None else torch.cat([self.v[i], v], dim=1)
        self._staged = [None] * self.num_layers
        self.frames = torch.cat([self.frames, frames])
        self._evict()

    def _evict(self) -> None:
        if not self.window:
            return
        keep = (self.frames >= self.end + self.block_size - self.window) | (self.frames < self.sink)
        if bool(keep.all()):
            return
        token_keep = keep.repeat_interleave(self.tokens_per_frame).to(self.k[0].device)
        for i in range(self.num_layers):
            self.k[i] = self.k[i][:, token_keep]
            self.v[i] = self.v[i][:, token_keep]
        self.frames = self.frames[keep]

    # -- cross-attention (text) -------------------------------------------------------------------

    def cross(self, layer: int, text: Tensor, compute: Callable[[], tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
        """Text K/V for `layer`, computed once per prompt. A different `text` (by value) resets the cache."""
        if self._text is None or self._text.shape != text.shape or not torch.equal(self._text, text):
            self._text = text.detach().clone()
            self._cross = [None] * self.num_layers
        if self._cross[layer] is None:
            k, v = compute()
            self._cross[layer] = (k.detach(), v.detach())
        return self._cross[layer]

    def memory_bytes(self) -> int:
        tensors = [t for t in self.k + self.v if t is not None]
        tensors += [t for kv in self._cross if kv is not None for t in kv]
        return sum(t.numel() * t.element_size() for t in tensors)
