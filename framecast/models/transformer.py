"""CausalWanTransformer: the one network (architecture.md §2, method.md §3.2).

A subclass of diffusers' `WanTransformer3DModel` that keeps `__init__` and every module name, so Wan2.1
state dicts (diffusers format, or the original format through diffusers' converter) load unchanged. Only
the forward is ours. It takes explicitly what the stock forward cannot express:

* an `AttentionPlan` (bidirectional / block-causal / teacher-forcing packed `[clean ; noisy]`);
* a `KVCache` with the committed clean context, and whether this forward commits its block;
* absolute RoPE frame positions (a streamed block at frame f gets temporal positions f..f+K-1);
* per-frame sigma (per-frame adaLN, so frames of one forward can sit at different noise levels);
* an optional per-frame embedding added to the time embedding (action conditioning).

The causal pieces (input checks, teacher-forcing packing, plan -> mask, absolute-position RoPE, the KV-cache
side of self- and cross-attention, the lazy text embedding) live in backbone.py as plain functions behind
the `Backbone` protocol; this module keeps only what is Wan's: patch embedding, time embedding, the blocks'
module layout and the adaLN head.

With a bidirectional plan and no cache the output equals the stock forward on the same weights
(tests/test_transformer.py uses the stock class as the oracle).

Shapes: videos are [B, F, C, H, W] (architecture.md §3); tokens per frame T = (H/ph)(W/pw) are derived, never
assumed; the token sequence is frame-major, [B, F*T, D].
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers.models.transformers.transformer_wan import WanTransformer3DModel, WanTransformerBlock

from ..errors import ConfigError
from ..config import ModelConfig
from .attention import AttentionPlan
from .backbone import (BIDIRECTIONAL, SPATIAL_FREQS, LazyText, TokenGrid, apply_rope, attend,
                       cached_self_attention_kv, check_inputs, cross_attention_kv, pack_teacher_forcing, patchify,
                       plan_mask, rope_3axis, spatial_features, unpatchify)
from .kv_cache import KVCache
from .kv_snapshot import ContextSnapshot

Tensor = torch.Tensor

__all__ = ["BIDIRECTIONAL", "CausalWanTransformer", "build_transformer", "count_params", "forward_flops"]


class CausalWanTransformer(WanTransformer3DModel):
    """Wan2.1 DiT whose causality is an argument (plan, cache), not a fork of the network (a `Backbone`)."""

    attention_backend = "sdpa"  # set per instance by `build_transformer`; "flex" is the CUDA opt-in

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
        token_emb: Tensor | None = None,
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
            token_emb: per-token embedding [B, F, T, D] added to the patch tokens (model.action_tokens).
        """
        if stock_kwargs:  # diffusers pipelines call transformer(hidden_states=..., timestep=..., ...)
            return super().forward(**stock_kwargs)
        cfg = self.config
        grid, sigma, positions = check_inputs(  # grid: B, F, H, W, T tokens per frame; sigma [B, F]
            x, sigma, text, positions=positions, frame_emb=frame_emb, cache=cache, commit=commit,
            channels=cfg.in_channels, text_dim=cfg.text_dim, dim=self.inner_dim, patch_size=cfg.patch_size,
            token_emb=token_emb)
        x, sigma, positions, frame_emb = pack_teacher_forcing(  # [B, Fs, C, H, W], Fs = 2F under teacher forcing
            x, sigma, positions, frame_emb, clean, clean_sigma, plan, cache)
        if token_emb is not None and clean is not None:
            token_emb = torch.cat([token_emb, token_emb], dim=1)  # the clean twin gets its frame's actions too
        h = self._patchify(x, grid, token_emb)  # [B, Fs*T, D]
        temb, mod = self._time_embedding(sigma, frame_emb, h)  # [B, Fs, D], [B, Fs, 6, D]
        text_states = LazyText(self.condition_embedder.text_embedder, text)  # [B, Lt, D]; a warm cache never asks
        rope = rope_3axis(positions, grid.hp, grid.wp, cfg.attention_head_dim)  # complex [Fs*T, head_dim/2]
        mask = None if cache is not None else plan_mask(plan, grid.F, grid.T, h.device, self.attention_backend)
        h = self._blocks(h, text_states, mod, rope, mask, cache, commit, grid.T)  # [B, Fs*T, D]
        if commit:
            cache.commit(positions)  # type: ignore[union-attr]
        return self._head(h, temb, grid)  # [B, F, C, H, W]

    # ---------------------------------------------------------------------------------------------
    # pieces
    # ---------------------------------------------------------------------------------------------

    @property
    def inner_dim(self) -> int:
        return self.config.num_attention_heads * self.config.attention_head_dim

    def _patchify(self, x: Tensor, grid: TokenGrid, token_emb: Tensor | None = None) -> Tensor:
        """[B, Fs, C, H, W] -> [B, Fs*T, D]. The Conv3d has stride == kernel, so it is one matmul over
        non-overlapping (C, ph, pw) patches; as a linear it avoids the slow CPU convolution path (benchmarks/)."""
        conv = self.patch_embedding
        h = F.linear(patchify(x, grid), conv.weight.flatten(1), conv.bias)  # [B, Fs, hp, wp, D]
        embed = getattr(self, "spatial_embed", None)  # model.spatial_embed: absolute (row, column) per token
        if embed is not None:
            pos = embed(spatial_features(grid.hp, grid.wp, h.device).to(embed.weight.dtype))  # [hp*wp, D]
            h = h + pos.view(grid.hp, grid.wp, -1).type_as(h)
        if token_emb is not None:  # [B, Fs, T, D], T row-major like the token grid
            h = h + token_emb.unflatten(2, (grid.hp, grid.wp)).type_as(h)
        return h.flatten(1, 3)

    def _time_embedding(self, sigma: Tensor, frame_emb: Tensor | None, h: Tensor) -> tuple[Tensor, Tensor]:
        """Per-frame time embedding: sigma [B, Fs] -> temb [B, Fs, D] (+ frame_emb), modulation [B, Fs, 6, D]."""
        ce = self.condition_embedder
        tproj = ce.timesteps_proj(sigma.flatten() * 1000.0)  # Wan's t = 1000 sigma
        tdtype = next(ce.time_embedder.parameters()).dtype
        temb = ce.time_embedder(tproj.to(tdtype)).unflatten(0, tuple(sigma.shape)).type_as(h)
        if frame_emb is not None:
            temb = temb + frame_emb.to(temb.dtype)
        return temb, ce.time_proj(ce.act_fn(temb)).unflatten(2, (6, -1))

    def _blocks(self, h: Tensor, text: LazyText, mod: Tensor, rope: Tensor, mask, cache: KVCache | None,
                commit: bool, T: int) -> Tensor:
        """All blocks, each under gradient checkpointing when enabled (any forward with grad that commits nothing:
        packed training, and DMD's cached exit steps, which read a snapshot of the cache, models/kv_snapshot.py).
        Each block is called as a module, so FSDP2's per-block hooks gather its weights just in time."""
        checkpointing = torch.is_grad_enabled() and self.gradient_checkpointing and not commit
        if checkpointing:
            text.get()  # embed outside the checkpoints, or block 0's recomputation would save fewer tensors
            cache = None if cache is None else ContextSnapshot(cache)  # what the recompute in backward reads
        for i, block in enumerate(self.blocks):
            args = (h, text, mod, rope, mask, cache, commit, T, i, self.attention_backend)
            if checkpointing:
                h = torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False)
            else:
                h = block(*args)
        return h

    def _head(self, h: Tensor, temb: Tensor, grid: TokenGrid) -> Tensor:
        """adaLN head, per frame: [B, Fs*T, D] -> v [B, F, C, H, W] for the last F frames (x's half)."""
        shift, scale = (self.scale_shift_table[:, None] + temb[:, :, None]).unbind(2)  # each [B, Fs, D]
        h = h.unflatten(1, (-1, grid.T))  # [B, Fs, T, D]
        h = (self.norm_out(h.float()) * (1 + scale[:, :, None]) + shift[:, :, None]).type_as(h)
        h = h[:, h.shape[1] - grid.F:]  # under teacher forcing only the noisy half is predicted (method.md §3.3)
        return unpatchify(self.proj_out(h), grid, self.config.out_channels)  # from [B, F, T, ph*pw*Cout]


class CausalWanBlock(WanTransformerBlock):
    """A diffusers `WanTransformerBlock` (same weights and keys) whose forward takes per-frame modulation, a plan
    mask and a KV cache. `build_transformer` gives every block this class, so blocks run as module calls."""

    def forward(self, h: Tensor, text: LazyText, mod: Tensor, rope, mask=None,  # type: ignore[override]
                cache: KVCache | None = None, commit: bool = False, T: int = 0, i: int = 0,
                backend: str = "sdpa") -> Tensor:
        """Block `i` with per-frame modulation, a plan mask and a KV cache: h [B, Fs*T, D] -> [B, Fs*T, D].
        Called with the stock arguments (hidden states, encoder states, temb, rotary), it is diffusers' block."""
        if not isinstance(text, LazyText):  # the stock forward (kept as the oracle of tests/test_transformer.py)
            return super().forward(h, text, mod, rope)
        block = self
        B, L, D = h.shape
        Fs = L // T
        m = (block.scale_shift_table[:, None] + mod.float()).unsqueeze(3)  # [B, Fs, 6, 1, D]
        shift_msa, scale_msa, gate_msa, c_shift, c_scale, c_gate = m.unbind(2)  # each [B, Fs, 1, D]

        def frames(t: Tensor) -> Tensor:
            return t.view(B, Fs, T, D)

        n = (frames(block.norm1(h.float())) * (1 + scale_msa) + shift_msa).view(B, L, D).type_as(h)
        a = self._self_attention(i, block.attn1, n, rope, mask, cache, commit, backend)
        h = (frames(h.float()) + frames(a) * gate_msa).view(B, L, D).type_as(h)

        n = block.norm2(h.float()).type_as(h)
        h = h + self._cross_attention(i, block.attn2, n, text, cache)

        n = (frames(block.norm3(h.float())) * (1 + c_scale) + c_shift).view(B, L, D).type_as(h)
        f = block.ffn(n)
        # h + gated ffn, added in [B, L, D]: a fresh tensor, not a view (FSDP2 hooks the block's output)
        return (h.float() + (frames(f.float()) * c_gate).view(B, L, D)).type_as(h)

    @staticmethod
    def _self_attention(i: int, attn, n: Tensor, rope, mask, cache: KVCache | None, commit: bool,
                        backend: str) -> Tensor:
        heads = attn.heads
        if getattr(attn, "fused_projections", False):  # after `fuse_qkv_projections()`: one matmul, not three
            q, k, v = attn.to_qkv(n).chunk(3, dim=-1)
        else:
            q, k, v = attn.to_q(n), attn.to_k(n), attn.to_v(n)
        q = attn.norm_q(q).unflatten(2, (heads, -1))  # [B, L, H, Dh]
        k = attn.norm_k(k).unflatten(2, (heads, -1))
        v = v.unflatten(2, (heads, -1))
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        k, v = cached_self_attention_kv(i, k, v, cache, commit)  # [B, Lc + L, H, Dh] (method.md §3.4)
        out = attend(q, k, v, mask, backend)
        return attn.to_out[1](attn.to_out[0](out.flatten(2).type_as(q)))

    @staticmethod
    def _cross_attention(i: int, attn, n: Tensor, text: LazyText, cache: KVCache | None) -> Tensor:
        if attn.add_k_proj is not None:
            raise NotImplementedError("image cross-attention (Wan I2V-14B add_k_proj) is not supported")
        heads = attn.heads
        q = attn.norm_q(attn.to_q(n)).unflatten(2, (heads, -1))

        def text_kv(states: Tensor) -> tuple[Tensor, Tensor]:
            if getattr(attn, "fused_projections", False):
                k, v = attn.to_kv(states).chunk(2, dim=-1)
            else:
                k, v = attn.to_k(states), attn.to_v(states)
            return attn.norm_k(k).unflatten(2, (heads, -1)), v.unflatten(2, (heads, -1))

        k, v = cross_attention_kv(i, cache, text, text_kv)  # per-prompt cache, without grad only
        out = attend(q, k, v, None, "sdpa")
        return attn.to_out[1](attn.to_out[0](out.flatten(2).type_as(q)))



def build_transformer(cfg: ModelConfig, *, device: str | torch.device = "cpu") -> CausalWanTransformer:
    """Instantiate from a config preset. `device="meta"` builds the Wan-scale models without memory."""
    if cfg.attention_backend not in ("sdpa", "flex"):
        raise ConfigError(f"unknown attention backend {cfg.attention_backend!r}; choose sdpa or flex")
    with torch.device(device):
        net = CausalWanTransformer(
            patch_size=tuple(cfg.patch_size), num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim,
            in_channels=cfg.in_channels, out_channels=cfg.out_channels, text_dim=cfg.text_dim,
            freq_dim=cfg.freq_dim, ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers,
            cross_attn_norm=cfg.cross_attn_norm, qk_norm="rms_norm_across_heads", eps=cfg.eps,
            rope_max_seq_len=cfg.rope_max_seq_len,
        )
    net.attention_backend = cfg.attention_backend
    if cfg.spatial_embed:  # zero-initialised: a network initialised from one without it starts as that network
        with torch.device(device):
            net.spatial_embed = torch.nn.Linear(4 * SPATIAL_FREQS, net.inner_dim)
        torch.nn.init.zeros_(net.spatial_embed.weight)
        torch.nn.init.zeros_(net.spatial_embed.bias)
    for block in net.blocks:  # the same module with our forward (its state dict keys are unchanged)
        block.__class__ = CausalWanBlock
    if cfg.gradient_checkpointing:
        net.gradient_checkpointing = True
    return net


def capacity_problem(cfg: ModelConfig) -> str:
    """Why the network cannot fit flow matching's velocity, or "" when it can.

    The output layer maps each token's `dim` features to the patch's patch_t*patch_h*patch_w*out_channels
    values, so its outputs span at most `dim` of them. The velocity target eps - x0 holds the isotropic noise
    of every value, and the part of it outside that span cannot be predicted: the per-element loss cannot fall
    below (values - dim) / values. Breakout's 8x8 RGB patches through the toy width (192 values, width 128)
    sat at 0.36 against that bound of 0.33 (docs/world_model.md, "Breakout")."""
    values = math.prod(cfg.patch_size) * cfg.out_channels
    if values <= cfg.dim:
        return ""
    return (f"each token outputs {values} values (patch {tuple(cfg.patch_size)} x {cfg.out_channels} channels) "
            f"through a {cfg.dim}-wide network: the noise in {values - cfg.dim} of them cannot be predicted and "
            f"the loss cannot fall below {(values - cfg.dim) / values:.2f}; use a smaller patch or a wider model")


def count_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def forward_flops(cfg: ModelConfig, query_tokens: int, key_tokens: int, text_tokens: int, *,
                  text_kv: bool = True, out_tokens: int | None = None) -> float:
    """Matmul FLOPs of one forward (2 per multiply-add), for FLOP/s-vs-peak benchmarks.

    Counts projections, attention scores and values, cross-attention and FFN; ignores norms/elementwise.
    `text_kv=False` leaves out the text K/V projections, which a warm streaming cache does not recompute.
    `out_tokens`: tokens the head projects (default all queries; a packed teacher-forcing forward projects only
    its noisy half, `_head`).
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
    Lo = L if out_tokens is None else out_tokens
    io = 2 * L * D * cfg.in_channels * ph * pw + 2 * Lo * D * cfg.out_channels * ph * pw  # patch embed + proj out
    return float(cfg.num_layers * per_layer + io)
