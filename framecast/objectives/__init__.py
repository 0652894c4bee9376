"""Objectives: `(networks, batch) -> {name: (loss, logs)}` (architecture.md §2).

An objective receives its networks from the pipeline (never builds them), declares which of them train
(`roles`, one optimiser each, keyed by the loss name) and returns named losses per step. The trainer
(train/loop.py) maps names to optimisers and knows nothing else about the method.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from ..data.batch import Batch

Tensor = torch.Tensor
Losses = dict[str, tuple[Tensor, dict[str, float]]]


class Objective(Protocol):
    roles: dict[str, nn.Module]  # trainable networks by loss name

    def losses(self, batch: Batch, step: int, generator: torch.Generator) -> Losses: ...
