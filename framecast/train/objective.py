"""The `Objective` base class: the trainer's contract with a method (architecture.md §2).

It lives beside the trainer because it is what the trainer may ask; the methods (framecast/objectives/)
subclass it. An objective receives its networks from its stage (stages.py, never builds them), declares which of them train
(`roles`, one optimiser each, keyed by the loss name) and returns named losses per step. Every other hook
the trainer (train/loop.py) calls has a no-op default here, so a method overrides only what it needs:

    roles            {name: module}, set by the subclass; one optimiser per role
    losses(...)      {name: (loss, logs)} for the roles this step trains (abstract)
    ema_roles        the roles that keep an EMA; None (the default) means all of them (ema_role_names())
    after_update(n)  called after each optimiser step of role n (CD: move the target network, method.md §6)
    state_modules()  extra networks saved in and restored from checkpoints (CD: that target)
    frozen_modules() networks it only reads (teacher, real score): sharded under torchrun, never saved
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import nn

from ..data.batch import Batch

Tensor = torch.Tensor
Losses = dict[str, tuple[Tensor, dict[str, float]]]  # loss name (= role) -> (scalar loss, floats to log)


class Objective(ABC):
    roles: dict[str, nn.Module]  # trainable networks by loss name
    ema_roles: tuple[str, ...] | None = None  # roles that keep an EMA; None: all roles

    @abstractmethod
    def losses(self, batch: Batch, step: int, generator: torch.Generator) -> Losses:
        """The named losses of one (micro-)batch; all randomness comes from `generator` (exact resume)."""

    def ema_role_names(self) -> tuple[str, ...]:
        """The roles that keep an EMA: `ema_roles`, or every role when it is None."""
        names = tuple(self.roles) if self.ema_roles is None else tuple(self.ema_roles)
        unknown = set(names) - set(self.roles)
        if unknown:
            raise KeyError(f"ema_roles {sorted(unknown)} are not roles of {type(self).__name__} "
                           f"({sorted(self.roles)})")
        return names

    def after_update(self, name: str) -> None:
        """Called by the trainer after each optimiser step of role `name`; nothing by default."""

    def state_modules(self) -> dict[str, nn.Module]:
        """Networks besides the roles that checkpoints save and restore (saved as `obj_<name>`); none by default."""
        return {}

    def frozen_modules(self) -> dict[str, nn.Module]:
        """Networks the objective only reads (a teacher, a real score); none by default. Under torchrun they are
        sharded like the roles, without gradients or optimiser state (train/distributed.py)."""
        return {}
