"""The backbone seam: what the rest of framecast needs from a network, and the causal machinery to build one.

`Denoiser` and `KVCache` talk to a `Backbone` (architecture.md §2), never to a concrete class. Everything that
makes a video DiT causal without forking it lives here as plain functions, so a second backbone reuses them
and only writes its own patchify / time embedding / blocks / head:

* input checks (`check_inputs`, `check_video`, `check_sigma`, `frame_positions`) and the token grid;
* teacher-forcing packing `[clean ; noisy]` with twin RoPE positions and `clean_sigma` (method.md §3.3);
* plan -> mask (`plan_mask`: dense SDPA mask, or a flex `BlockMask`) and `attend`;
* absolute-position 3-axis RoPE (`rope_3axis`, `apply_rope`, method.md §3.2);
* the KV-cache side of attention: staging and context concatenation in self-attention
  (`cached_self_attention_kv`) and the per-prompt text K/V (`cross_attention_kv`, method.md §3.4);
* `LazyText`, the text embedding computed on first use.

Shapes: videos are [B, F, C, H, W] (architecture.md §3); tokens per frame T = (H/ph)(W/pw) are derived, never
assumed; the token sequence is frame-major, [B, F*T, D].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sized, runtime_checkable

import torch
import torch.nn.functional as F

from .attention import AttentionPlan
from .kv_cache import KVCache

Tensor = torch.Tensor

BIDIRECTIONAL = AttentionPlan("bidirectional")


@runtime_checkable
class Backbone(Protocol):
    """A velocity network that takes its causality as arguments (plan, cache), not as a fork.

    `Denoiser` calls it and sizes a `KVCache` from it: one cache layer per block (`blocks`; a backbone with
    no block list may expose `num_layers` instead, see `layer_count`), and `inner_dim` for `frame_emb`.
    `token_emb` (model.action_tokens) is passed only to a model that has the token route.
    """

    @property
    def inner_dim(self) -> int: ...

    @property
    def blocks(self) -> Sized: ...

    def forward(self, x: Tensor, sigma: Tensor, text: Tensor, *, plan: AttentionPlan = BIDIRECTIONAL,
                positions: Tensor | None = None, cache: KVCache | None = None, commit: bool = False,
                clean: Tensor | None = None, clean_sigma: Tensor | None = None,
                frame_emb: Tensor | None = None, token_emb: Tensor | None = None) -> Tensor: ...

    def __call__(self, x: Tensor, sigma: Tensor, text: Tensor, *, plan: AttentionPlan = BIDIRECTIONAL,
                 positions: Tensor | None = None, cache: KVCache | None = None, commit: bool = False,
                 clean: Tensor | None = None, clean_sigma: Tensor | None = None,
                 frame_emb: Tensor | None = None, token_emb: Tensor | None = None) -> Tensor: ...


def layer_count(net: Any) -> int:
    """Layers a `KVCache` needs for `net`: len(net.blocks), or `net.num_layers` for a backbone without blocks."""
    blocks = getattr(net, "blocks", None)
    return len(blocks) if blocks is not None else int(net.num_layers)


# -------------------------------------------------------------------------------------------------
# inputs
# -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenGrid:
    """Token layout of one forward: B videos of F frames of H x W, cut into ph x pw patches."""

    B: int
    F: int
    H: int
    W: int
    ph: int
    pw: int

    @property
    def hp(self) -> int:
        return self.H // self.ph

    @property
    def wp(self) -> int:
        return self.W // self.pw

    @property
    def T(self) -> int:
        """Tokens per frame."""
        return self.hp * self.wp


def check_video(x: Tensor | None, channels: int, name: str) -> tuple[int, int, int, int, int]:
    if x is None or x.ndim != 5:
        raise ValueError(f"{name} must be a video [B, F, C, H, W], got {None if x is None else tuple(x.shape)}")
    if x.shape[2] != channels:
        raise ValueError(f"{name} has {x.shape[2]} channels, the model expects {channels} "
                         f"(shape {tuple(x.shape)} read as [B, F, C, H, W])")
    return tuple(x.shape)  # type: ignore[return-value]


def check_sigma(sigma: Tensor | None, B: int, Fn: int) -> Tensor:
    if sigma is None:
        raise ValueError("sigma is required ([B, F] noise level per frame)")
    if sigma.ndim == 1 and sigma.shape[0] == B:
        sigma = sigma[:, None].expand(B, Fn)
    if sigma.shape != (B, Fn):
        raise ValueError(f"sigma must be [B={B}, F={Fn}] (or [B]), got {tuple(sigma.shape)}")
    return sigma.float()


def frame_positions(positions: Tensor | None, cache: KVCache | None, Fn: int, device: torch.device) -> Tensor:
    """Absolute frame positions [Fn]: given, or 0..F-1, or cache.end + 0..F-1 with a cache (method.md §3.4)."""
    if positions is None:
        start = cache.end if cache is not None else 0
        positions = torch.arange(start, start + Fn, device=device)
    positions = positions.to(device)
    if positions.shape != (Fn,):
        raise ValueError(f"positions must have shape [{Fn}], got {tuple(positions.shape)}")
    return positions


def check_inputs(x: Tensor | None, sigma: Tensor | None, text: Tensor | None, *, positions: Tensor | None,
                 frame_emb: Tensor | None, cache: KVCache | None, commit: bool, channels: int, text_dim: int,
                 dim: int, patch_size: tuple[int, int, int],
                 token_emb: Tensor | None = None) -> tuple[TokenGrid, Tensor, Tensor]:
    """Validate one forward's arguments; returns (grid, sigma [B, F] float, positions [F])."""
    B, Fn, C, H, W = check_video(x, channels, "x")
    pt, ph, pw = patch_size
    if pt != 1:
        raise NotImplementedError(f"temporal patch size {pt} is not supported; frame-wise causality needs pt=1")
    if H % ph or W % pw:
        raise ValueError(f"frame size {H}x{W} is not divisible by the patch size {ph}x{pw}")
    sigma = check_sigma(sigma, B, Fn)
    if text is None or text.ndim != 3 or text.shape[0] != B or text.shape[2] != text_dim:
        raise ValueError(f"text must be [B={B}, tokens, text_dim={text_dim}], "
                         f"got {None if text is None else tuple(text.shape)}")
    positions = frame_positions(positions, cache, Fn, x.device)  # type: ignore[union-attr]
    if frame_emb is not None and frame_emb.shape != (B, Fn, dim):
        raise ValueError(f"frame_emb must be [{B}, {Fn}, {dim}], got {tuple(frame_emb.shape)}")
    grid = TokenGrid(B, Fn, H, W, ph, pw)
    if token_emb is not None and token_emb.shape != (B, Fn, grid.T, dim):
        raise ValueError(f"token_emb must be [{B}, {Fn}, {grid.T}, {dim}] (T = {grid.hp}x{grid.wp} tokens per frame: "
                         f"model.action_tokens must be {grid.T}), got {tuple(token_emb.shape)}")
    if commit and cache is None:
        raise ValueError("commit=True needs a cache")
    return grid, sigma, positions


def pack_teacher_forcing(x: Tensor, sigma: Tensor, positions: Tensor, frame_emb: Tensor | None,
                         clean: Tensor | None, clean_sigma: Tensor | None, plan: AttentionPlan,
                         cache: KVCache | None) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """Pack the clean copy before x (method.md §3.3): [B, F, ...] -> [B, 2F, ...]; a no-op without `clean`.

    The clean twin gets sigma `clean_sigma` (default 0) and the same RoPE positions and frame embedding.
    """
    if clean is None:
        if plan.kind == "teacher_forcing" and cache is None:
            raise ValueError("the teacher_forcing plan needs the clean copy (clean=...)")
        return x, sigma, positions, frame_emb
    if plan.kind != "teacher_forcing" or cache is not None:
        raise ValueError("a clean copy needs the teacher_forcing plan and no cache")
    if clean.shape != x.shape:
        raise ValueError(f"clean copy {tuple(clean.shape)} must match x {tuple(x.shape)}")
    B, Fn = sigma.shape
    clean_sigma = torch.zeros_like(sigma) if clean_sigma is None else check_sigma(clean_sigma, B, Fn)
    x = torch.cat([clean, x], dim=1)  # [B, 2F, C, H, W]: clean copy first (method.md §3.3)
    sigma = torch.cat([clean_sigma, sigma], dim=1)  # [B, 2F]
    positions = torch.cat([positions, positions])  # twins share temporal positions
    if frame_emb is not None:
        frame_emb = torch.cat([frame_emb, frame_emb], dim=1)
    return x, sigma, positions, frame_emb


# -------------------------------------------------------------------------------------------------
# patches, positions, masks
# -------------------------------------------------------------------------------------------------


def patchify(x: Tensor, grid: TokenGrid) -> Tensor:
    """[B, Fs, C, H, W] -> non-overlapping patches [B, Fs, hp, wp, C*ph*pw] (Fs frames, 2F under teacher forcing)."""
    patches = x.reshape(grid.B, x.shape[1], -1, grid.hp, grid.ph, grid.wp, grid.pw)  # [B, Fs, C, hp, ph, wp, pw]
    return patches.permute(0, 1, 3, 5, 2, 4, 6).flatten(4)


def unpatchify(out: Tensor, grid: TokenGrid, channels: int) -> Tensor:
    """[B, F, T, ph*pw*C] -> [B, F, C, H, W] (inverse of `patchify` for the output channels)."""
    B, Fn = grid.B, grid.F
    out = out.reshape(B, Fn, grid.hp, grid.wp, grid.ph, grid.pw, channels).permute(0, 1, 6, 2, 4, 3, 5)
    return out.reshape(B, Fn, channels, grid.H, grid.W)  # from [B, F, C, hp, ph, wp, pw]


def rope_3axis(positions: Tensor, hp: int, wp: int, head_dim: int) -> Tensor:
    """3-axis RoPE from absolute positions (no table, so an unbounded stream never runs past it).

    Same frequencies as diffusers' `WanRotaryPosEmbed` (head dim split t/h/w, theta 1e4), but the
    temporal axis is indexed by `positions` instead of 0..F-1 (method.md §3.2 `causal_rope_apply`).
    Returns complex [Fs*hp*wp, head_dim/2], frame-major.
    """
    hd = head_dim
    h_dim = w_dim = 2 * (hd // 6)
    t_dim = hd - h_dim - w_dim
    dev = positions.device

    def angles(dim: int, pos: Tensor) -> Tensor:  # [N] -> [N, dim/2], float64 like the stock table
        inv = 1.0 / (10000.0 ** (torch.arange(0, dim, 2, dtype=torch.float64, device=dev)[: dim // 2] / dim))
        return torch.outer(pos.to(torch.float64), inv)

    Fs = positions.numel()
    at = angles(t_dim, positions)[:, None, None].expand(Fs, hp, wp, -1)
    ah = angles(h_dim, torch.arange(hp, device=dev))[None, :, None].expand(Fs, hp, wp, -1)
    aw = angles(w_dim, torch.arange(wp, device=dev))[None, None, :].expand(Fs, hp, wp, -1)
    a = torch.cat([at, ah, aw], dim=-1).reshape(Fs * hp * wp, hd // 2)
    return torch.polar(torch.ones_like(a), a).to(torch.complex64)  # exp(i a), angles kept in float64


SPATIAL_FREQS = 8  # sinusoid periods 2, 4, ..., 256 tokens: unique (row, column) codes up to 256 x 256 tokens


def spatial_features(hp: int, wp: int, device: torch.device | str = "cpu") -> Tensor:
    """sin / cos of each token's row and column at SPATIAL_FREQS frequencies: [hp*wp, 4*SPATIAL_FREQS], row-major
    like the token grid. Absolute positions within a frame, for `model.spatial_embed` (a learned projection)."""
    w = torch.pi / 2.0 ** torch.arange(SPATIAL_FREQS, dtype=torch.float32, device=device)  # [n]
    r = torch.arange(hp, dtype=torch.float32, device=device)[:, None, None] * w  # [hp, 1, n]
    c = torch.arange(wp, dtype=torch.float32, device=device)[None, :, None] * w  # [1, wp, n]
    r, c = r.expand(hp, wp, -1), c.expand(hp, wp, -1)
    return torch.cat([r.sin(), r.cos(), c.sin(), c.cos()], -1).flatten(0, 1)  # [hp*wp, 4n]


def apply_rope(x: Tensor, rot: Tensor) -> Tensor:
    """Rotate interleaved pairs (x[2j], x[2j+1]) by the angle of pair j, as one complex product.

    x [B, L, H, Dh] real; rot [L, Dh/2] complex exp(i angle). Same maths as diffusers' Wan processor.
    """
    xc = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))  # [B, L, H, Dh/2]
    return torch.view_as_real(xc * rot[None, :, None]).flatten(-2).type_as(x)


def plan_mask(plan: AttentionPlan, num_frames: int, tokens_per_frame: int, device: torch.device, backend: str):
    """The plan's mask for a cache-less forward: a flex `BlockMask` (causal plans, flex backend), else the
    dense boolean SDPA mask or None (method.md §3.3). `num_frames` counts x's frames, not the packed 2F."""
    if backend == "flex" and plan.kind != "bidirectional":
        return plan.block_mask(num_frames, tokens_per_frame, device)
    return plan.dense_mask(num_frames, tokens_per_frame, device)


def attend(q: Tensor, k: Tensor, v: Tensor, mask, backend: str) -> Tensor:
    """[B, Lq, H, Dh] x [B, Lk, H, Dh] -> [B, Lq, H, Dh]."""
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if backend == "flex" and mask is not None and not isinstance(mask, Tensor):
        from torch.nn.attention.flex_attention import flex_attention

        out = flex_attention(q, k, v, block_mask=mask)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out.transpose(1, 2)


# -------------------------------------------------------------------------------------------------
# the cache side of attention
# -------------------------------------------------------------------------------------------------


def cached_self_attention_kv(i: int, k: Tensor, v: Tensor, cache: KVCache | None,
                             commit: bool) -> tuple[Tensor, Tensor]:
    """Layer i's self-attention keys/values with the cache (method.md §3.4): stage the block's post-RoPE
    K/V when committing, then prepend the committed context. [B, L, H, Dh] -> [B, Lc + L, H, Dh]."""
    if cache is None:
        return k, v
    if commit:
        cache.stage(i, k, v)
    ck, cv = cache.context(i)
    if ck is not None:
        k, v = torch.cat([ck.to(k.dtype), k], dim=1), torch.cat([cv.to(v.dtype), v], dim=1)
    return k, v


class LazyText:
    """Text embedding computed on first use: streaming with a warm per-prompt cache skips the text MLP."""

    def __init__(self, embed: Callable[[Tensor], Tensor], raw: Tensor) -> None:
        self.raw, self._embed, self._states = raw, embed, None

    def get(self) -> Tensor:
        if self._states is None:
            self._states = self._embed(self.raw)
        return self._states


def cross_attention_kv(i: int, cache: KVCache | None, text: LazyText,
                       compute: Callable[[Tensor], tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """Layer i's text K/V, `compute(text states)`; through the per-prompt cache (keyed on the raw encoder
    states, method.md §3.4) only without grad, since the cache holds detached K/V."""
    if cache is not None and not torch.is_grad_enabled():
        return cache.cross(i, text.raw, lambda: compute(text.get()))
    return compute(text.get())
