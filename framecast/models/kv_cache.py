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

`StaticKVCache` is the opt-in fast path with the same interface: preallocated per-layer ring buffers and no
growing tensors, so every steady-state forward has static shapes and buffer addresses (torch.compile, CUDA
graphs). `KVCache` stays the default.
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


class StaticKVCache(CommittedFrames):
    """`KVCache`'s interface and eviction rule over preallocated per-layer ring buffers (method.md §3.4).

    Slots hold whole frames: `capacity = sink + window - block_size` with a window (the most frames the rule
    ever keeps; the block itself is never stored, the backbone appends it), else `max_frames`. Sink frames
    f < sink live in slot f; any other frame in slot sink + (f - sink) mod (window - block_size), which is free
    after eviction because kept frames span fewer than window - block_size positions. `commit` copies the
    staged block into its slots: no allocation after the first commit (buffers are sized from the staged K/V's
    batch, heads, head dim, dtype and device, or by `allocate`), and `reset` keeps them.

    `context(i)` returns the valid slots. Keys are post-RoPE with absolute positions and the cached path has no
    mask, so key order cannot change the attention, only its float summation order:

    * `order="frame"` (default): frames ascending, as `KVCache` holds them, through an index kept on the
      device and updated in place (one gather per forward); the same frames as `KVCache`, bit for bit.
    * `order="ring"`: the slots as stored (a view, no copy, once the ring is full); equal up to float
      summation order (tests/test_static_cache.py states the tolerance).
    """

    ORDERS = ("frame", "ring")

    def __init__(self, num_layers: int, *, block_size: int = 1, window: int = 0, sink: int = 0,
                 max_frames: int = 0, order: str = "frame") -> None:
        if window and window < block_size:
            raise ValueError(f"window ({window} frames) must cover at least one block ({block_size} frames)")
        if bool(window) == bool(max_frames):
            raise ValueError(f"a static cache needs a window > 0 or, without one, max_frames > 0 "
                             f"(got window={window}, max_frames={max_frames})")
        if order not in self.ORDERS:
            raise ValueError(f"order must be one of {self.ORDERS}, got {order!r}")
        self.num_layers, self.block_size, self.window, self.sink = num_layers, block_size, window, sink
        self.max_frames, self.order = max_frames, order
        self.capacity = sink + window - block_size if window else max_frames  # frames
        self.k: list[Tensor | None] = [None] * num_layers  # [B, capacity*T, H, D], allocated once
        self.v: list[Tensor | None] = [None] * num_layers
        self.reset()

    def reset(self) -> None:
        """Forget all context and the cached prompt; the buffers are kept for the next stream."""
        L = self.num_layers
        self._slot_frame = [-1] * self.capacity  # absolute frame held by each slot, -1 = free
        self._frames: list[int] = []  # kept frames, ascending
        self._end = self._committed = self._tokens = 0
        self._live = False  # something was committed since reset
        self._index: Tensor | None = None  # [n*T] token index of the context in `order`; None: a prefix view
        self.tokens_per_frame = 0
        self._staged: list[tuple[Tensor, Tensor] | None] = [None] * L
        self._text: Tensor | None = None
        self._text_src: tuple[Tensor, int] | None = None  # the last text object seen and its version
        self._cross: list[tuple[Tensor, Tensor] | None] = [None] * L

    @property
    def frames(self) -> Tensor:  # type: ignore[override]
        return torch.tensor(self._frames, dtype=torch.long)

    @property
    def num_frames(self) -> int:
        return len(self._frames)

    @property
    def end(self) -> int:
        """One past the last committed frame (kept or evicted); 0 when nothing was committed."""
        return self._end

    def allocate(self, batch: int, tokens_per_frame: int, heads: int, head_dim: int, *,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:
        """Allocate the buffers now instead of on the first commit (e.g. before capturing a CUDA graph)."""
        if self._committed:
            raise ValueError("allocate() before the first commit (or after reset())")
        shape = (batch, self.capacity * tokens_per_frame, heads, head_dim)
        dev, k = torch.device(device), self.k[0]
        if k is None or k.shape != shape or k.dtype != dtype or k.device.type != dev.type or \
                (dev.index is not None and k.device.index != dev.index):
            self.k = [_static(torch.empty(shape, dtype=dtype, device=device)) for _ in range(self.num_layers)]
            self.v = [_static(torch.empty(shape, dtype=dtype, device=device)) for _ in range(self.num_layers)]
        self.tokens_per_frame = tokens_per_frame

    # -- self-attention context -------------------------------------------------------------------

    def context(self, layer: int) -> tuple[Tensor | None, Tensor | None]:
        k, v = self.k[layer], self.v[layer]
        if not self._live or k is None or v is None:  # a bool, not the frame count: compiled guards stay put
            return None, None
        if self._index is None:
            return k[:, : self._tokens], v[:, : self._tokens]  # [B, n*T, H, D] views
        return k.index_select(1, self._index), v.index_select(1, self._index)  # [B, n*T, H, D]

    def stage(self, layer: int, k: Tensor, v: Tensor) -> None:
        """Called by a commit forward: the block's clean K/V for `layer` ([B, Lb, H, D], post-RoPE)."""
        self._staged[layer] = (k.detach(), v.detach())

    @torch.compiler.disable  # host-side slot bookkeeping between captured forwards
    def commit(self, frames: Tensor) -> None:
        """Copy the staged K/V of `frames` (absolute, ascending) into their slots, after evicting as KVCache."""
        if any(s is None for s in self._staged):
            missing = [i for i, s in enumerate(self._staged) if s is None]
            raise RuntimeError(f"commit without staged K/V for layers {missing}; run a commit forward first")
        new = frames.detach().cpu().long().tolist()
        if self._committed and min(new) < self._end:
            raise ValueError(f"frames {new} overlap the cache, which ends at frame {self._end}")
        k0 = self._staged[0][0]  # type: ignore[index]
        if k0.shape[1] % len(new):
            raise ValueError(f"{k0.shape[1]} staged tokens do not split into {len(new)} frames")
        T = k0.shape[1] // len(new)
        if self._committed and T != self.tokens_per_frame:
            raise ValueError(f"block has {T} tokens per frame, the cache holds {self.tokens_per_frame}")
        if not self._committed:
            self.allocate(k0.shape[0], T, k0.shape[2], k0.shape[3], dtype=k0.dtype, device=k0.device)
        end = max(self._end, max(new) + 1)
        slot_frame = [f if f >= 0 and self._keeps(f, end) else -1 for f in self._slot_frame]  # evict
        writes = []  # (frame j of the block, slot); planned before any copy, so a refused commit changes nothing
        for j, f in enumerate(new):
            if self._keeps(f, end):
                s = self._slot_for(f, slot_frame)
                slot_frame[s] = f
                writes.append((j, s))
        for i, (k, v) in enumerate(self._staged):  # type: ignore[misc]
            for j, s in writes:  # [B, T, H, D] into slot s
                self.k[i][:, s * T:(s + 1) * T].copy_(k[:, j * T:(j + 1) * T])  # type: ignore[index]
                self.v[i][:, s * T:(s + 1) * T].copy_(v[:, j * T:(j + 1) * T])  # type: ignore[index]
        self._slot_frame, self._staged = slot_frame, [None] * self.num_layers
        self._end, self._committed, self._live = end, self._committed + len(new), True
        self._update_index()

    def _keeps(self, f: int, end: int) -> bool:
        """KVCache's eviction rule after committing up to `end`: the next block sees f >= end + K - window."""
        return not self.window or f >= end + self.block_size - self.window or f < self.sink

    def _slot_for(self, f: int, slot_frame: list[int]) -> int:
        if not self.window:  # no eviction: frames fill the slots in commit order
            if -1 not in slot_frame:
                raise ValueError(f"the static cache is full ({self.max_frames} frames, max_frames); give a "
                                 f"window or a larger max_frames")
            return slot_frame.index(-1)
        S, R = self.sink, self.window - self.block_size
        s = f if f < S else S + (f - S) % R
        if slot_frame[s] >= 0:  # cannot happen under the rule above; guards the invariant
            raise RuntimeError(f"slot {s} for frame {f} still holds frame {slot_frame[s]}")
        return s

    def _update_index(self) -> None:
        """The context's token index in `order`; a view (None) while the valid slots are an ordered prefix."""
        T = self.tokens_per_frame
        held = sorted((f, s) for s, f in enumerate(self._slot_frame) if f >= 0)  # frame order
        self._frames = [f for f, _ in held]
        slots = [s for _, s in held] if self.order == "frame" else sorted(s for _, s in held)
        self._tokens = len(slots) * T
        if slots == list(range(len(slots))) and (self.order == "ring" or len(slots) < self.capacity):
            self._index = None  # frame order keeps its gather once full, so steady state has one code path
            return
        idx = (torch.tensor(slots, dtype=torch.long)[:, None] * T + torch.arange(T)).flatten()  # [n*T]
        if self._index is not None and self._index.shape == idx.shape:
            self._index.copy_(idx)  # in place: a captured graph keeps reading the same address
        else:
            self._index = _static(idx.to(self.k[0].device))  # type: ignore[union-attr]

    # -- cross-attention (text) -------------------------------------------------------------------

    def cross(self, layer: int, text: Tensor, compute: Callable[[], tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
        """Text K/V for `layer`, computed once per prompt. The text tensor seen last (unmodified: eager checks its
        `_version`) is the same prompt; any other is compared by value, outside compiled graphs. Under
        torch.compile the identity check is traced without a graph break, so a compiled stream switches prompts
        with a new tensor (Session.switch_prompt does) rather than by writing into the old one."""
        src = self._text_src
        if src is None or src[0] is not text or (not torch.compiler.is_compiling() and src[1] != text._version):
            self._check_prompt(text)
        if self._cross[layer] is None:
            k, v = compute()
            self._cross[layer] = (k.detach(), v.detach())
        return self._cross[layer]  # type: ignore[return-value]

    @torch.compiler.disable  # data-dependent (torch.equal); runs once per new text tensor
    def _check_prompt(self, text: Tensor) -> None:
        if self._text is None or self._text.shape != text.shape or not torch.equal(self._text, text):
            self._text = text.detach().clone()
            self._cross = [None] * self.num_layers
        self._text_src = (text, text._version)

    def memory_bytes(self) -> int:
        tensors = [t for t in self.k + self.v if t is not None]
        tensors += [t for kv in self._cross if kv is not None for t in kv]
        return sum(t.numel() * t.element_size() for t in tensors)


def _static(t: Tensor) -> Tensor:
    """Tell torch.compile's CUDA graphs that `t` keeps its address, so replays read it in place, uncopied."""
    torch._dynamo.mark_static_address(t)
    return t
