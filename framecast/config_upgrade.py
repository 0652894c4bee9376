"""Configs as older framecast versions wrote them: where moved keys live now, and the upgrade of stored configs.

`distill:` held every method's knobs until it was split by method: what users write gets one "moved to" error
(`refuse_moved`), what checkpoints stored is upgraded (`upgrade`) so old runs still load, resume and sample.
"""

from __future__ import annotations

import copy
from typing import Any

from .errors import ConfigError

# `distill:` held every method's knobs until split by method: recipes get a "moved to" error, checkpoints `upgrade`
MOVED = {
    "denoising_steps": ["few_step.denoising_steps"], "first_block_steps": ["few_step.first_block_steps"],
    "grid_steps": ["ode.grid_steps", "cd.grid_steps"], "teacher": ["ode.teacher", "cd.teacher"],
    "guidance": ["ode.guidance", "cd.guidance"], "ode_teacher": ["ode.teacher_kind"],
    "num_pairs": ["ode.num_pairs"], "shard_size": ["ode.shard_size"], "pairs_dir": ["ode.pairs_dir"],
    "pair_mode": ["ode.pair_mode"], "target_decay": ["cd.target_decay"], "real": ["dmd.real"],
    "critic": ["dmd.critic"], "real_guidance": ["dmd.real_guidance"], "critic_ratio": ["dmd.critic_ratio"],
    "critic_lr": ["dmd.critic_lr"], "critic_betas": ["dmd.critic_betas"], "dmd_sigma_min": ["dmd.sigma_min"],
    "dmd_sigma_max": ["dmd.sigma_max"], "context_sigma": ["dmd.context_sigma"],
}



def refuse_moved(data: dict[str, Any]) -> None:
    """One clear error for a `distill:` section: say where each of its keys lives now."""
    old = data.get("distill")
    if old is None:
        return
    keys = sorted(old) if isinstance(old, dict) else []
    where = "; ".join(f"distill.{k} -> {' / '.join(MOVED[k])}" for k in keys if k in MOVED)
    raise ConfigError("config section 'distill' was split by method into few_step:, ode:, cd: and dmd:"
                      + (f" ({where})" if where else "") + "; move the keys there")


def upgrade(data: dict[str, Any]) -> dict[str, Any]:
    """A config as an older framecast stored it (in a checkpoint or a run folder), in today's layout: `distill:`
    is split into its method sections and model keys added since keep their defaults, so old runs still load,
    resume and sample. What users write is never upgraded: `from_dict` refuses it."""
    data = copy.deepcopy(data)
    old = data.pop("distill", None)
    if isinstance(old, dict):
        for key, value in old.items():
            for dotted in MOVED.get(key, []):
                section, name = dotted.split(".")
                data.setdefault(section, {})[name] = value
    return data
