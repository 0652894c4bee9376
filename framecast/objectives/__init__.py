"""Objectives: `(networks, batch) -> {name: (loss, logs)}` (architecture.md §2).

Each method subclasses `Objective` (base.py), which declares the hooks the trainer (train/loop.py) calls:
`roles`, `losses` and the optional `ema_roles`, `after_update`, `state_modules`.
"""

from ..train.objective import Losses, Objective

__all__ = ["Losses", "Objective"]
