"""The training batch that every objective receives."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..models.conditioning import Cond

Tensor = torch.Tensor


@dataclass
class Batch:
    video: Tensor  # [B, F, C, H, W] clean latents
    cond: Cond  # conditioning of each video
    null: Cond  # the null conditioning (empty prompt / null actions), same batch size: CFG and dropout
    captions: list[str]

    def to(self, device: torch.device | str) -> "Batch":
        return Batch(self.video.to(device), self.cond.to(device), self.null.to(device), self.captions)
