"""Flow matching for Stage 0 (bidirectional) and Stage 1 (AR diffusion), method.md §4.

    x_s = (1 - s) x0 + s eps,  target v* = eps - x0,  L = mean_{B,F}[ w(s_f) mean_{C,H,W} (v - v*)^2 ]

* bidirectional (Stage 0): one sigma per video, full attention.
* teacher_forcing (Stage 1, TF): one sigma per block, packed [clean ; noisy] forward under the TF mask, so
  each noisy block sees the clean ground-truth prefix, exactly the conditional used at inference (P1 Prop. 3.4).
* diffusion_forcing (Stage 1, DF baseline): one sigma per block on the noisy sequence under the block-causal
  mask, so context is noisy in training but clean at inference (the mismatch P1 Prop. 3.4 describes).

The weight w is the Stage-1 bell (flow.bell_weight, zero at sigma = 1) or uniform; objective.motion_weight
adds a per-element weight on what moved since the previous frame (motion_weights). Caption dropout
replaces a fraction of prompts by the null prompt so CFG has an unconditional branch to use.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import rng
from ..errors import ConfigError
from .. import flow
from ..config import FlowConfig, ObjectiveConfig
from ..data.batch import Batch
from ..models.attention import AttentionPlan
from ..models.conditioning import Cond
from ..models.denoiser import Denoiser
from . import Losses, Objective

MODES = ("bidirectional", "teacher_forcing", "diffusion_forcing")


def plan_for_mode(mode: str, obj: ObjectiveConfig) -> AttentionPlan:
    if mode == "bidirectional":
        return AttentionPlan("bidirectional")
    kind = {"teacher_forcing": "teacher_forcing", "diffusion_forcing": "block_causal"}[mode]
    return AttentionPlan(kind, obj.block_size, obj.window, obj.sink)


def drop_text(cond: Cond, null: Cond, p: float, generator: torch.Generator) -> Cond:
    """Replace the conditioning of each sample -- its prompt and, for world models, its actions -- by the null
    one with probability p, so the model also learns the unconditional velocity (CFG training)."""
    if p <= 0:
        return cond
    drop = rng.rand((cond.batch,), generator) < p  # [B]
    text = torch.where(drop[:, None, None].to(cond.text.device), null.text, cond.text)
    actions = cond.actions
    if actions is not None and null.actions is not None:
        actions = torch.where(drop[:, None].to(actions.device), null.actions, actions)  # [B, F]
    return Cond(text, actions)


def motion_weights(x0: Tensor, weight: float, threshold: float) -> Tensor:
    """Per-element loss weights 1 + weight * [any channel of the frame changed from the previous frame by more
    than threshold], 1 on the first frame. The moved region covers both where a sprite was and where it is.

    Why: in a game screen the part the actions move (Breakout's paddle, about 3x1 of 32x32 px) is a fraction
    of a percent of the loss, so the uniform mean learns the static screen long before the part the actions
    control (docs/world_model.md, "Breakout"). The weight depends on the clean frames only, so the minimiser
    for an element is the weighted conditional mean; for deterministic dynamics given the context frames and
    the action it is the same frame, and otherwise it leans towards outcomes that move more."""
    moved = (x0[:, 1:] - x0[:, :-1]).abs().amax(dim=2, keepdim=True) > threshold  # [B, F-1, 1, H, W]
    moved = torch.cat([torch.zeros_like(moved[:, :1]), moved], dim=1)  # [B, F, 1, H, W]
    return 1.0 + weight * moved.to(x0.dtype)


class FlowMatching(Objective):
    def __init__(self, model: Denoiser, flow_cfg: FlowConfig, obj: ObjectiveConfig) -> None:
        if obj.mode not in MODES:
            raise ConfigError(f"unknown objective.mode {obj.mode!r}; choose one of {MODES}")
        if flow_cfg.weighting not in ("bell", "uniform"):
            raise ConfigError(f"unknown flow.weighting {flow_cfg.weighting!r}; choose bell or uniform")
        self.model, self.flow, self.obj = model, flow_cfg, obj
        self.plan = plan_for_mode(obj.mode, obj)
        self.roles = {"model": model}

    def losses(self, batch: Batch, step: int, generator: torch.Generator) -> Losses:
        x0 = batch.video  # [B, F, C, H, W]
        B, F = x0.shape[:2]
        sigma = flow.sample_block_sigmas(
            B, F, self.obj.block_size, self.flow.shift, num_train_timesteps=self.flow.num_train_timesteps,
            generator=generator, shared=self.obj.mode == "bidirectional").to(x0.device)  # [B, F]
        eps = rng.randn(x0.shape, generator).to(x0)
        xt = flow.add_noise(x0, eps, sigma)
        cond = drop_text(batch.cond, batch.null, self.obj.text_dropout, generator)
        clean = x0 if self.obj.mode == "teacher_forcing" else None
        v = self.model.velocity(xt, sigma, cond, plan=self.plan, clean=clean)
        err = (v - flow.velocity_target(x0, eps)).pow(2)  # [B, F, C, H, W]
        mse = err.mean(dim=(2, 3, 4))  # [B, F], logged unweighted
        per_frame = mse
        if self.obj.motion_weight > 0:
            m = motion_weights(x0, self.obj.motion_weight, self.obj.motion_threshold)  # [B, F, 1, H, W]
            per_frame = (err * m).mean(dim=(2, 3, 4))  # [B, F]
        if self.flow.weighting == "bell":
            w = flow.bell_weight(sigma, self.flow.shift, self.flow.num_train_timesteps)
        else:
            w = torch.ones_like(sigma)
        loss = (w * per_frame).mean()
        return {"model": (loss, {"loss": loss.item(), "mse": mse.mean().item()})}
