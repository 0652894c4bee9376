"""Attention plans: which frame may attend to which (method.md §3.3), defined once as a frame-level rule.

A plan is data, not a fork of the network: the same `CausalWanTransformer` is bidirectional, block-causal
(diffusion forcing, Self-Forcing's ODE init) or teacher-forcing (packed `[clean ; noisy]`) depending on
the plan it is given. The rule `allowed(q, k)` is written once over frame indices and realised as

* a dense boolean mask for `scaled_dot_product_attention` (CPU and training; flex has no CPU backward),
* a FlexAttention `BlockMask` through `mask_mod` (CUDA, opt-in via `model.attention_backend=flex`).

Blocks are aligned at frame 0: frame f belongs to block f // K. A window of W frames (counting the
query's own block) plus `sink` leading frames bounds what a query block sees; the KV cache evicts with
the same rule (kv_cache.py), which is what makes streaming equal the packed forward (architecture.md §4).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

Tensor = torch.Tensor

KINDS = ("bidirectional", "block_causal", "teacher_forcing")


@dataclass(frozen=True)
class AttentionPlan:
    kind: str = "bidirectional"
    block_size: int = 1  # K frames per block
    window: int = 0  # frames visible to a query block, its own block included; 0 = unbounded
    sink: int = 0  # leading frames that stay visible under a window

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown attention plan {self.kind!r}; choose one of {KINDS}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if self.window and self.window < self.block_size:
            raise ValueError(f"window ({self.window} frames) must cover at least one block ({self.block_size})")
        if self.window and self.kind == "bidirectional":
            raise ValueError("a window only makes sense for causal plans (block_causal, teacher_forcing)")
        if self.sink < 0 or self.window < 0:
            raise ValueError(f"window and sink must be >= 0, got window={self.window}, sink={self.sink}")

    @property
    def causal(self) -> bool:
        return self.kind != "bidirectional"

    # -- the rule -------------------------------------------------------------------------------

    def _in_window(self, qf: Tensor, kf: Tensor) -> Tensor:
        """Key frame kf is within the window of query frame qf's block (or is a sink frame)."""
        if not self.window:
            return torch.ones_like(qf * kf, dtype=torch.bool)
        q_block_end = (qf // self.block_size + 1) * self.block_size
        return (kf >= q_block_end - self.window) | (kf < self.sink)

    def allowed(self, qf: Tensor, qc: Tensor, kf: Tensor, kc: Tensor) -> Tensor:
        """Broadcasting rule on frame indices `qf, kf` and clean flags `qc, kc` (True = clean copy).

        * bidirectional: everything.
        * block_causal: key block <= query block (full attention inside a block), within the window.
        * teacher_forcing (method.md §3.3): a clean query sees clean keys block-causally; a noisy query sees
          noisy keys of its own block only, plus clean keys of strictly earlier blocks. A noisy block
          never sees its own clean copy (that would leak the answer, method.md §12.9).
        """
        K = self.block_size
        qb, kb = qf // K, kf // K
        if self.kind == "bidirectional":
            return torch.ones_like(qb * kb, dtype=torch.bool)
        win = self._in_window(qf, kf)
        if self.kind == "block_causal":
            return (kb <= qb) & win
        clean_q = kc & (kb <= qb) & win
        noisy_q = (~kc & (kb == qb)) | (kc & (kb < qb) & win)
        return torch.where(qc, clean_q, noisy_q)

    # -- realisations ---------------------------------------------------------------------------

    def frame_tags(self, num_frames: int, device: torch.device | None = None) -> tuple[Tensor, Tensor]:
        """(frame index, clean flag) per sequence frame; teacher forcing packs [clean F ; noisy F]."""
        f = torch.arange(num_frames, device=device)
        if self.kind == "teacher_forcing":
            return torch.cat([f, f]), torch.cat([torch.ones_like(f, dtype=torch.bool),
                                                 torch.zeros_like(f, dtype=torch.bool)])
        return f, torch.zeros_like(f, dtype=torch.bool)

    def dense_mask(self, num_frames: int, tokens_per_frame: int, device: torch.device | None = None) -> Tensor | None:
        """Boolean [L, L] SDPA mask (True = attend) for a cache-less forward, or None if all True."""
        if self.kind == "bidirectional":
            return None
        f, c = self.frame_tags(num_frames, device)
        m = self.allowed(f[:, None], c[:, None], f[None, :], c[None, :])  # [Fs, Fs]
        if bool(m.all()):
            return None
        return m.repeat_interleave(tokens_per_frame, 0).repeat_interleave(tokens_per_frame, 1)

    def mask_mod(self, num_frames: int, tokens_per_frame: int):
        """FlexAttention mask_mod over token indices, same rule as `dense_mask`."""
        T, F = tokens_per_frame, num_frames
        tf = self.kind == "teacher_forcing"

        def mod(b, h, q_idx, kv_idx):
            qf, kf = q_idx // T, kv_idx // T
            if tf:
                qc, kc = qf < F, kf < F
                qf, kf = qf % F, kf % F
            else:
                qc = kc = qf < 0  # all False, traced as a tensor
            return self.allowed(qf, qc, kf, kc)

        return mod

    def block_mask(self, num_frames: int, tokens_per_frame: int, device: torch.device):
        """A flex `BlockMask` (CUDA path). Imported lazily: flex is an opt-in layer."""
        from torch.nn.attention.flex_attention import create_block_mask

        L = num_frames * tokens_per_frame * (2 if self.kind == "teacher_forcing" else 1)
        return create_block_mask(self.mask_mod(num_frames, tokens_per_frame), None, None, L, L, device=device)

