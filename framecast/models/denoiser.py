"""Denoiser: the one place that knows the parameterisation (velocity <-> x0), CFG and the cache commit.

Objectives, samplers and the rollout talk to a `Denoiser`, never to the raw network (architecture.md §2).
Anything with the same methods can stand in for it, e.g. the analytic teachers of `data/vectors.py`. The
network it wraps is any `Backbone` (backbone.py), e.g. `CausalWanTransformer`.

CFG (method.md §12.1): `v = v_u + g (v_c - v_u)`. With guidance the conditional and null branches run as one
doubled batch, so a KV cache used with guidance holds both branches (batch 2B) and every call on that
cache, commits included, must pass the same guidance.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .. import flow
from .attention import AttentionPlan
from .backbone import BIDIRECTIONAL, Backbone, layer_count
from .conditioning import ActionEmbedder, Cond
from .kv_cache import KVCache, StaticKVCache

Tensor = torch.Tensor


@dataclass
class Guidance:
    scale: float
    null: Cond  # the unconditional branch (empty prompt / null actions), same batch size as cond

    @property
    def active(self) -> bool:
        return self.scale != 1.0


class Denoiser(nn.Module):
    """Wraps the backbone (and the optional action embedder); these are the trainable parameters of a role."""

    def __init__(self, net: Backbone, action_embed: ActionEmbedder | None = None) -> None:
        super().__init__()
        self.net = net
        self.action_embed = action_embed

    @property
    def num_layers(self) -> int:
        return layer_count(self.net)

    def new_cache(self, *, block_size: int = 1, window: int = 0, sink: int = 0, static: bool = False,
                  max_frames: int = 0, order: str = "frame") -> KVCache | StaticKVCache:
        """A fresh stream context. `static=True`: the preallocated ring-buffer cache of the fast GPU path
        (kv_cache.StaticKVCache; needs a window or `max_frames`, `order` "frame" or "ring")."""
        if static:
            return StaticKVCache(self.num_layers, block_size=block_size, window=window, sink=sink,
                                 max_frames=max_frames, order=order)
        return KVCache(self.num_layers, block_size=block_size, window=window, sink=sink)

    def _action_kwargs(self, cond: Cond, frames: int) -> dict[str, Tensor]:
        """The backbone's action inputs: frame_emb [B, F, D] (adaLN route) and, with model.action_tokens,
        token_emb [B, F, T, D] (token route); none without an action embedder."""
        if self.action_embed is None:
            if cond.actions is not None:
                raise ValueError("actions were given but this model has no action embedder (model.num_actions=0)")
            return {}
        actions = cond.actions
        if actions is None:
            actions = self.action_embed.null(cond.batch, frames, cond.text.device)
        if actions.shape != (cond.batch, frames):
            raise ValueError(f"actions must be [B={cond.batch}, F={frames}] for this forward, got {tuple(actions.shape)}")
        out = {"frame_emb": self.action_embed(actions)}
        tokens = self.action_embed.token_emb(actions)
        if tokens is not None:  # only then: a backbone without the token route never sees the argument
            out["token_emb"] = tokens
        return out

    def _raw(self, x: Tensor, sigma: Tensor, cond: Cond, **kw) -> Tensor:
        return self.net(x, sigma, cond.text, **self._action_kwargs(cond, x.shape[1]), **kw)

    def velocity(self, x: Tensor, sigma: Tensor, cond: Cond, *, guidance: Guidance | None = None,
                 plan: AttentionPlan = BIDIRECTIONAL, cache: KVCache | None = None, positions: Tensor | None = None,
                 clean: Tensor | None = None) -> Tensor:
        """v[B, F, C, H, W] for x[B, F, C, H, W] at sigma[B, F] (method.md §2), with optional CFG."""
        kw = dict(plan=plan, cache=cache, positions=positions)
        if guidance is None or not guidance.active:
            return self._raw(x, sigma, cond, clean=clean, **kw)
        both = cond.cat(guidance.null)
        v = self._raw(torch.cat([x, x]), torch.cat([sigma, sigma]), both,
                      clean=None if clean is None else torch.cat([clean, clean]), **kw)
        v_c, v_u = v.chunk(2)
        return v_u + guidance.scale * (v_c - v_u)

    def x0(self, x: Tensor, sigma: Tensor, cond: Cond, **kw) -> Tensor:
        """x0 = x - sigma v (the consistency/few-step parameterisation, method.md §6)."""
        return flow.v_to_x0(x, self.velocity(x, sigma, cond, **kw), sigma)

    @torch.no_grad()
    def commit(self, x0: Tensor, cond: Cond, cache: KVCache, *, positions: Tensor | None = None,
               sigma: float = 0.0, guidance: Guidance | None = None) -> None:
        """Write the clean K/V of a finished block into the cache (method.md §3.4 refresh pass).

        `sigma` is the context noise level fed to the time embedding; the block itself is passed as given
        (inference never re-noises the context, method.md §12.8).
        """
        s = torch.full(x0.shape[:2], float(sigma), device=x0.device)
        if guidance is not None and guidance.active:
            x0, s, cond = torch.cat([x0, x0]), torch.cat([s, s]), cond.cat(guidance.null)
        self._raw(x0, s, cond, cache=cache, positions=positions, commit=True)
