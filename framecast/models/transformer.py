"""CausalWanTransformer: the one network (architecture.md §2, method.md §3.2).

A subclass of diffusers' `WanTransformer3DModel` that keeps `__init__` and every module name, so Wan2.1
state dicts (diffusers format, or the original format through diffusers' converter) load unchanged. Only
the forward is ours. It takes explicitly what the stock forward cannot express:

* an `AttentionPlan` (bidirectional / block-causal / teacher-forcing packed `[clean ; noisy]`);
* a `KVCache` with the committed clean context, and whether this forward commits its block;
* absolute RoPE frame positions (a streamed block at frame f gets temporal positions f..f+K-1);
* per-frame sigma (per-frame adaLN, so frames of one forward can sit at different noise levels);
* an optional per-frame embedding added to the time embedding (action conditioning).

With a bidirectional plan and no cache the output equals the stock forward on the same weights
(tests/test_transformer.py uses the stock class as the oracle).

Shapes: videos are [B, F, C, H, W] (architecture.md §3); tokens per frame T = (H/ph)(W/pw) are derived, never
assumed; the token sequence is frame-major, [B, F*T, D].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.transformers.transformer_wan import WanTransformer3DModel

from ..config import ModelConfig
from .attention import AttentionPlan
from .kv_cache import KVCache

Tensor = torch.Tensor

BIDIRECTIONAL = AttentionPlan("bidirectional")


class CausalWanTransformer(WanTransformer3DModel):
    """Wan2.1 DiT whose causality is an argument (plan, cache), not a fork of the network."""

    attention_backend = "sdpa"  # set per instance by `build_transformer`; "flex" is the CUDA opt-in

    # ---------------------------------------------------------------------------------------------
    # forward
    # ---------------------------------------------------------------------------------------------

    def forward(  # type: ignore[override]
        self,
        x: Tensor | None = None,
        sigma: Tensor | None = None,
        text: Tensor | None = None,
        *,
        plan: AttentionPlan = BIDIRECTIONAL,
        positions: Tensor | None = None,
        cache: KVCache | None = None,
        commit: bool = False,
        clean: Tensor | None = None,
        clean_sigma: Tensor | None = None,
        frame_emb: Tensor | None = None,
        **stock_kwargs,
    ) -> Tensor:
        """Velocity prediction v[B, F, C, H, W].

        Args:
            x: noisy video [B, F, C, H, W].
            sigma: noise level per frame [B, F] (or [B]); the embedding sees t = 1000 sigma.
            text: encoder states [B, Lt, text_dim].
            plan: attention plan for a cache-less forward. Ignored with a cache, where the block sees the
                whole cache plus itself (the cache already holds exactly the visible context).
            positions: absolute frame positions [F]; default 0..F-1, or cache.end + 0..F-1 with a cache.
            cache: streaming context. Read-only unless `commit`.
            commit: stage this forward's K/V in the cache and commit them as frames `positions`.
            clean: teacher forcing (method.md §3.3): the clean copy [B, F, C, H, W] packed before x; it gets
                sigma `clean_sigma` (default 0) and the same RoPE positions; only x's half is returned.
            frame_emb: per-frame embedding [B, F, D] added to the time embedding (actions).
        """
        if stock_kwargs:  # diffusers pipelines call transformer(hidden_states=..., timestep=..., ...)
            return super().forward(**stock_kwargs)
        B, Fn, C, H, W = _check_video(x, self.config.in_channels, "x")
        pt, ph, pw = self.config.patch_size
        if pt != 1:
            raise NotImplementedError(f"temporal patch size {pt} is not supported; frame-wise causality needs pt=1")
        if H % ph or W % pw:
            raise ValueError(f"frame size {H}x{W} is not divisible by the patch size {ph}x{pw}")
        hp, wp = H // ph, W // pw
        T = hp * wp
        sigma = _check_sigma(sigma, B, Fn)
        if text is None or text.ndim != 3 or text.shape[0] != B or text.shape[2] != self.config.text_dim:
            raise ValueError(f"text must be [B={B}, tokens, text_dim={self.config.text_dim}], "
                             f"got {None if text is None else tuple(text.shape)}")
        if positions is None:
            start = cache.end if cache is not None else 0
            positions = torch.arange(start, start + Fn, device=x.device)
        positions = positions.to(x.device)
        if positions.shape != (Fn,):
            raise ValueError(f"positions must have shape [{Fn}], got {tuple(positions.shape)}")
        if frame_emb is not None and frame_emb.shape != (B, Fn, self.inner_dim):
            raise ValueError(f"frame_emb must be [{B}, {Fn}, {self.inner_dim}], got {tuple(frame_emb.shape)}")
        if commit and cache is None:
            raise ValueError("commit=True needs a cache")

        teacher_forcing = clean is not None
        if teacher_forcing:
            if plan.kind != "teacher_forcing" or cache is not None:
                raise ValueError("a clean copy needs the teacher_forcing plan and no cache")
            if clean.shape != x.shape:
                raise ValueError(f"clean copy {tuple(clean.shape)} must match x {tuple(x.shape)}")
            clean_sigma = torch.zeros_like(sigma) if clean_sigma is None else _check_sigma(clean_sigma, B, Fn)
            x = torch.cat([clean, x], dim=1)  # [B, 2F, C, H, W]: clean copy first (method.md §3.3)
            sigma = torch.cat([clean_sigma, sigma], dim=1)  # [B, 2F]
            positions = torch.cat([positions, positions])  # twins share temporal positions
            if frame_emb is not None:
                frame_emb = torch.cat([frame_emb, frame_emb], dim=1)
        elif plan.kind == "teacher_forcing" and cache is None:
            raise ValueError("the teacher_forcing plan needs the clean copy (clean=...)")
        Fs = x.shape[1]  # frames in the sequence (2F under teacher forcing)

        # patchify: [B, Fs, C, H, W] -> [B, Fs*T, D]. The Conv3d has stride == kernel, so it is one matmul over
        # non-overlapping (C, ph, pw) patches; as a linear it avoids the slow CPU convolution path (benchmarks/)
        patches = x.reshape(B, Fs, -1, hp, ph, wp, pw).permute(0, 1, 3, 5, 2, 4, 6).flatten(4)  # [B,Fs,hp,wp,C*ph*pw]
        conv = self.patch_embedding
        h = F.linear(patches, conv.weight.flatten(1), conv.bias).flatten(1, 3)  # [B, Fs*T, D]

        # per-frame time embedding: [B, Fs] -> temb [B, Fs, D], modulation [B, Fs, 6, D]
        ce = self.condition_embedder
        tproj = ce.timesteps_proj(sigma.flatten() * 1000.0)  # Wan's t = 1000 sigma
        tdtype = next(ce.time_embedder.parameters()).dtype
        temb = ce.time_embedder(tproj.to(tdtype)).unflatten(0, (B, Fs)).type_as(h)
        if frame_emb is not None:
            temb = temb + frame_emb.to(temb.dtype)
        mod = ce.time_proj(ce.act_fn(temb)).unflatten(2, (6, -1))  # [B, Fs, 6, D]
        text_states = _LazyText(ce.text_embedder, text)  # [B, Lt, D] when asked; a warm cache never asks

        rope = self._rope(positions, hp, wp)  # complex [Fs*T, head_dim/2]
        mask = None
        if cache is None:
            mask = self._mask(plan, Fn, T, x.device)

        for i, block in enumerate(self.blocks):
            args = (i, block, h, text_states, mod, rope, mask, cache, commit, T)
            if torch.is_grad_enabled() and self.gradient_checkpointing and cache is None:
                h = torch.utils.checkpoint.checkpoint(self._block, *args, use_reentrant=False)
            else:
                h = self._block(*args)
        if commit:
            cache.commit(positions)

        # adaLN head, per frame: [B, Fs, T, D]
        shift, scale = (self.scale_shift_table[:, None] + temb[:, :, None]).unbind(2)  # each [B, Fs, D]
        h = h.unflatten(1, (Fs, T))
        h = (self.norm_out(h.float()) * (1 + scale[:, :, None]) + shift[:, :, None]).type_as(h)
        if teacher_forcing:
            h = h[:, Fn:]  # only the noisy half is predicted
        out = self.proj_out(h)  # [B, F, T, ph*pw*Cout]
        Cout = self.config.out_channels
        out = out.reshape(B, Fn, hp, wp, ph, pw, Cout).permute(0, 1, 6, 2, 4, 3, 5)  # [B, F, C, hp, ph, wp, pw]
        return out.reshape(B, Fn, Cout, H, W)

    # ---------------------------------------------------------------------------------------------
    # pieces
    # ---------------------------------------------------------------------------------------------

    @property
    def inner_dim(self) -> int:
        return self.config.num_attention_heads * self.config.attention_head_dim

    def _mask(self, plan: AttentionPlan, num_frames: int, T: int, device: torch.device):
        if self.attention_backend == "flex" and plan.kind != "bidirectional":
            return plan.block_mask(num_frames, T, device)
        return plan.dense_mask(num_frames, T, device)

    def _rope(self, positions: Tensor, hp: int, wp: int) -> Tensor:
        """3-axis RoPE from absolute positions (no table, so an unbounded stream never runs past it).

        Same frequencies as diffusers' `WanRotaryPosEmbed` (head dim split t/h/w, theta 1e4), but the
        temporal axis is indexed by `positions` instead of 0..F-1 (method.md §3.2 `causal_rope_apply`).
        """
        hd = self.config.attention_head_dim
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

    def _block(self, i: int, block, h: Tensor, text: "_LazyText", mod: Tensor, rope, mask, cache: KVCache | None,
               commit: bool, T: int) -> Tensor:
        """One WanTransformerBlock with per-frame modulation, a plan mask and a KV cache."""
        B, L, D = h.shape
        Fs = L // T
        m = (block.scale_shift_table[:, None] + mod.float()).unsqueeze(3)  # [B, Fs, 6, 1, D]
        shift_msa, scale_msa, gate_msa, c_shift, c_scale, c_gate = m.unbind(2)  # each [B, Fs, 1, D]

        def frames(t: Tensor) -> Tensor:
            return t.view(B, Fs, T, D)

        n = (frames(block.norm1(h.float())) * (1 + scale_msa) + shift_msa).view(B, L, D).type_as(h)
        a = self._self_attention(i, block.attn1, n, rope, mask, cache, commit)
        h = (frames(h.float()) + frames(a) * gate_msa).view(B, L, D).type_as(h)

        n = block.norm2(h.float()).type_as(h)
        h = h + self._cross_attention(i, block.attn2, n, text, cache)

        n = (frames(block.norm3(h.float())) * (1 + c_scale) + c_shift).view(B, L, D).type_as(h)
        f = block.ffn(n)
        return (frames(h.float()) + frames(f.float()) * c_gate).view(B, L, D).type_as(h)

    def _self_attention(self, i: int, attn, n: Tensor, rope, mask, cache: KVCache | None, commit: bool) -> Tensor:
        heads = attn.heads
        if getattr(attn, "fused_projections", False):  # after `fuse_qkv_projections()`: one matmul, not three
            q, k, v = attn.to_qkv(n).chunk(3, dim=-1)
        else:
            q, k, v = attn.to_q(n), attn.to_k(n), attn.to_v(n)
        q = attn.norm_q(q).unflatten(2, (heads, -1))  # [B, L, H, Dh]
        k = attn.norm_k(k).unflatten(2, (heads, -1))
        v = v.unflatten(2, (heads, -1))
        q, k = _apply_rope(q, rope), _apply_rope(k, rope)
        if cache is not None:
            if commit:
                cache.stage(i, k, v)
            ck, cv = cache.context(i)
            if ck is not None:
                k, v = torch.cat([ck.to(k.dtype), k], dim=1), torch.cat([cv.to(v.dtype), v], dim=1)
        out = _attend(q, k, v, mask, self.attention_backend)
        return attn.to_out[1](attn.to_out[0](out.flatten(2).type_as(q)))

    def _cross_attention(self, i: int, attn, n: Tensor, text: "_LazyText", cache: KVCache | None) -> Tensor:
        if attn.add_k_proj is not None:
            raise NotImplementedError("image cross-attention (Wan I2V-14B add_k_proj) is not supported")
        heads = attn.heads
        q = attn.norm_q(attn.to_q(n)).unflatten(2, (heads, -1))

        def text_kv() -> tuple[Tensor, Tensor]:
            states = text.get()
            if getattr(attn, "fused_projections", False):
                k, v = attn.to_kv(states).chunk(2, dim=-1)
            else:
                k, v = attn.to_k(states), attn.to_v(states)
            return attn.norm_k(k).unflatten(2, (heads, -1)), v.unflatten(2, (heads, -1))

        # the per-prompt cache (keyed on the raw encoder states) holds detached K/V: use it only without grad
        if cache is not None and not torch.is_grad_enabled():
            k, v = cache.cross(i, text.raw, text_kv)
        else:
            k, v = text_kv()
        out = _attend(q, k, v, None, "sdpa")
        return attn.to_out[1](attn.to_out[0](out.flatten(2).type_as(q)))


class _LazyText:
    """Text embedding computed on first use: streaming with a warm per-prompt cache skips the text MLP."""

    def __init__(self, embed, raw: Tensor) -> None:
        self.raw, self._embed, self._states = raw, embed, None

    def get(self) -> Tensor:
        if self._states is None:
            self._states = self._embed(self.raw)
        return self._states


def _apply_rope(x: Tensor, rot: Tensor) -> Tensor:
    """Rotate interleaved pairs (x[2j], x[2j+1]) by the angle of pair j, as one complex product.

    x [B, L, H, Dh] real; rot [L, Dh/2] complex exp(i angle). Same maths as diffusers' Wan processor.
    """
    xc = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))  # [B, L, H, Dh/2]
    return torch.view_as_real(xc * rot[None, :, None]).flatten(-2).type_as(x)


def _attend(q: Tensor, k: Tensor, v: Tensor, mask, backend: str) -> Tensor:
    """[B, Lq, H, Dh] x [B, Lk, H, Dh] -> [B, Lq, H, Dh]."""
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if backend == "flex" and mask is not None and not isinstance(mask, Tensor):
        from torch.nn.attention.flex_attention import flex_attention

        out = flex_attention(q, k, v, block_mask=mask)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out.transpose(1, 2)


def _check_video(x: Tensor | None, channels: int, name: str) -> tuple[int, int, int, int, int]:
    if x is None or x.ndim != 5:
        raise ValueError(f"{name} must be a video [B, F, C, H, W], got {None if x is None else tuple(x.shape)}")
    if x.shape[2] != channels:
        raise ValueError(f"{name} has {x.shape[2]} channels, the model expects {channels} "
                         f"(shape {tuple(x.shape)} read as [B, F, C, H, W])")
    return tuple(x.shape)  # type: ignore[return-value]


def _check_sigma(sigma: Tensor | None, B: int, Fn: int) -> Tensor:
    if sigma is None:
        raise ValueError("sigma is required ([B, F] noise level per frame)")
    if sigma.ndim == 1 and sigma.shape[0] == B:
        sigma = sigma[:, None].expand(B, Fn)
    if sigma.shape != (B, Fn):
        raise ValueError(f"sigma must be [B={B}, F={Fn}] (or [B]), got {tuple(sigma.shape)}")
    return sigma.float()


def build_transformer(cfg: ModelConfig, *, device: str | torch.device = "cpu") -> CausalWanTransformer:
    """Instantiate from a config preset. `device="meta"` builds the Wan-scale models without memory."""
    if cfg.attention_backend not in ("sdpa", "flex"):
        raise ValueError(f"unknown attention backend {cfg.attention_backend!r}; choose sdpa or flex")
    with torch.device(device):
        net = CausalWanTransformer(
            patch_size=tuple(cfg.patch_size), num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim,
            in_channels=cfg.in_channels, out_channels=cfg.out_channels, text_dim=cfg.text_dim,
            freq_dim=cfg.freq_dim, ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers,
            cross_attn_norm=cfg.cross_attn_norm, qk_norm="rms_norm_across_heads", eps=cfg.eps,
            rope_max_seq_len=cfg.rope_max_seq_len,
        )
    net.attention_backend = cfg.attention_backend
    if cfg.gradient_checkpointing:
        net.gradient_checkpointing = True
    return net


def count_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def forward_flops(cfg: ModelConfig, query_tokens: int, key_tokens: int, text_tokens: int, *,
                  text_kv: bool = True) -> float:
    """Matmul FLOPs of one forward (2 per multiply-add), for FLOP/s-vs-peak benchmarks.

    Counts projections, attention scores and values, cross-attention and FFN; ignores norms/elementwise.
    `text_kv=False` leaves out the text K/V projections, which a warm streaming cache does not recompute.
    """
    D, L, Lk, Lt = cfg.dim, query_tokens, key_tokens, text_tokens
    per_layer = (
        2 * L * D * 3 * D  # q, k, v
        + 2 * 2 * L * Lk * D  # scores + weighted values
        + 2 * L * D * D  # self-attn out
        + 2 * L * D * D + (2 * 2 * Lt * D * D if text_kv else 0)  # cross q, cross k/v
        + 2 * 2 * L * Lt * D + 2 * L * D * D  # cross scores/values + out
        + 2 * 2 * L * D * cfg.ffn_dim  # ffn
    )
    ph, pw = cfg.patch_size[1:]
    io = 2 * L * D * cfg.in_channels * ph * pw * 2  # patch embed + proj out
    return float(cfg.num_layers * per_layer + io)
