"""Exponential moving average of a network's parameters (EMA generator, CD target network)."""

from __future__ import annotations

import torch
from torch import nn


class EMA:
    """Shadow copy in fp32: theta_ema <- d * theta_ema + (1 - d) * theta (method.md §6, §7.5)."""

    def __init__(self, module: nn.Module, decay: float) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.shadow = {k: v.detach().float().clone() for k, v in module.state_dict().items()}

    @torch.no_grad()
    def reset(self, module: nn.Module) -> None:
        """Restart the shadow from the module's current weights (the EMA is 'created' now)."""
        self.shadow = {k: v.detach().float().clone() for k, v in module.state_dict().items()}

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        for k, v in module.state_dict().items():
            s = self.shadow[k]
            if v.dtype.is_floating_point:
                s.mul_(self.decay).add_(v.detach().float(), alpha=1 - self.decay)
            else:
                s.copy_(v)

    @torch.no_grad()
    def copy_to(self, module: nn.Module) -> None:
        module.load_state_dict({k: v.to(module.state_dict()[k].dtype) for k, v in self.shadow.items()})

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.shadow

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        missing = set(self.shadow) - set(sd)
        if missing:
            raise KeyError(f"EMA state lacks {sorted(missing)[:3]}")
        self.shadow = {k: sd[k].float().clone() for k in self.shadow}
