"""The training batch that every objective receives."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..models.conditioning import Cond

Tensor = torch.Tensor


@dataclass
class Batch:
    video: Tensor  # [B, F, C, H, W] clean latents
    cond: Cond  # conditioning of each video
    null: Cond  # the null conditioning (empty prompt / null actions), same batch size: CFG and dropout
    captions: list[str]
    extra: dict[str, Tensor] = field(default_factory=dict)  # per-sample tensors of special sources (ODE pairs)

    def to(self, device: torch.device | str) -> "Batch":
        return Batch(self.video.to(device), self.cond.to(device), self.null.to(device), self.captions,
                     {k: v.to(device) for k, v in self.extra.items()})
