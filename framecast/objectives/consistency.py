"""Stage 2b: causal consistency distillation (Causal Forcing++, method.md §6).

Per step, for clean ground-truth videos x_gt and one grid index n ~ U{0..N-2} per video (all its frames):

    x_n      = (1 - s_n) x_gt + s_n eps                                    every frame at the same level
    x_{n+1}  = x_n + (s_{n+1} - s_n) v_T^cfg(x_n, s_n | clean = x_gt)      ONE online Euler step, no grad
    pred     = G_theta(x_n, s_n | clean = x_gt)          x0 = x - s v      with grad
    target   = G_target(x_{n+1}, s_{n+1} | clean = x_gt)                   EMA target network, no grad
    L        = mean (pred - target)^2

The teacher T is the frozen Stage-1 AR model, the context is the clean ground truth through the
teacher-forcing plan, and the sigmas are the exact fp32 grid (the reference's bf16 timesteps make its
first Euler step ~6 % short, method.md §12.6). The grid must contain the few-step sigmas (method.md §12.3). The pair
(N-1 -> N) is never trained: the map near sigma 0 is anchored by the x - s v parameterisation and the
Stage-1 initialisation (method.md §12.5). `boundary_pair=True` trains it too (n ~ U{0..N-1}): its target at
sigma 0 is the teacher's own one-step x0 (G(x, 0) = x), an anchor that the chain of pairs above it otherwise
lacks (not the paper's objective; docs/results.md, "The quickstart from the pretrained base"). After every
student update the target moves towards it with `target_decay` (`after_update`, called by the trainer) and is
saved with the checkpoint (`state_modules`). `objective.motion_weight` weighs the loss as it weighs Stage 1's
(diffusion.motion_weights), where the student must keep what a few moving elements carry (Breakout's paddle).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .. import rng
from ..errors import ConfigError
from .. import flow
from ..data.batch import Batch
from ..models.attention import AttentionPlan
from ..models.denoiser import Guidance
from .diffusion import motion_weights
from . import Losses, Objective

Tensor = torch.Tensor


def freeze(module):
    """A teacher: eval mode, no parameter takes gradients (analytic teachers have neither: returned as is)."""
    if not isinstance(module, nn.Module):
        return module
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


class CausalCD(Objective):
    def __init__(self, model, teacher, *, steps: int, shift: float, block_size: int, guidance: float,
                 target_decay: float, few_step_sigmas: Tensor | None = None, boundary_pair: bool = False,
                 motion: tuple[float, float] = (0.0, 0.0)) -> None:
        if steps < 2:
            raise ConfigError(f"cd.grid_steps must be >= 2 (a CD grid needs two points), got {steps}")
        if not 0.0 <= target_decay < 1.0:
            raise ConfigError(f"cd.target_decay must be in [0, 1), got {target_decay}")
        if few_step_sigmas is not None:
            flow.grid_indices(few_step_sigmas.to(torch.float64), steps, shift)  # raises if a sigma is off-grid
        self.model, self.teacher = model, freeze(teacher)
        self.target = freeze(copy.deepcopy(model))  # theta^- starts at the student's initialisation
        self.sigmas = flow.grid(steps, shift).float()  # [N + 1], ends at 0
        self.steps, self.guidance, self.decay = steps, guidance, target_decay
        self.pairs = steps if boundary_pair else steps - 1  # n ~ U{0..pairs-1}; the pair n -> n + 1
        self.motion = motion  # (objective.motion_weight, motion_threshold): the teacher's loss weighting
        self.plan = AttentionPlan("teacher_forcing", block_size)
        self.roles = {"model": model}

    def state_modules(self) -> dict[str, nn.Module]:
        return {"target": self.target}

    def frozen_modules(self) -> dict[str, nn.Module]:
        return {"teacher": self.teacher}

    @torch.no_grad()
    def after_update(self, name: str) -> None:
        """theta^- <- d theta^- + (1 - d) theta, after each student step (method.md §6)."""
        for t, s in zip(self.target.parameters(), self.model.parameters()):
            t.lerp_(s.detach().to(t.dtype), 1.0 - self.decay)

    @torch.no_grad()
    def teacher_step(self, x: Tensor, n: Tensor, batch: Batch) -> Tensor:
        """One Euler step of the teacher's CFG ODE from grid point n to n + 1 (per video)."""
        s, s_next = self._sig(n, x), self._sig(n + 1, x)
        g = Guidance(self.guidance, batch.null) if self.guidance != 1.0 else None
        v = self.teacher.velocity(x, s, batch.cond, guidance=g, plan=self.plan, clean=batch.video)
        return flow.euler_step(x, v, s, s_next)

    def _sig(self, n: Tensor, x: Tensor) -> Tensor:
        return self.sigmas.to(x.device)[n][:, None].expand(x.shape[:2])  # [B, F], one level per video

    def losses(self, batch: Batch, step: int, generator: torch.Generator) -> Losses:
        x_gt = batch.video  # [B, F, C, H, W]
        n = rng.randint(0, self.pairs, (x_gt.shape[0],), generator).to(x_gt.device)  # [B]
        eps = rng.randn(x_gt.shape, generator).to(x_gt)
        x_n = flow.add_noise(x_gt, eps, self._sig(n, x_gt))
        x_next = self.teacher_step(x_n, n, batch)
        with torch.no_grad():
            target = self.target.x0(x_next, self._sig(n + 1, x_gt), batch.cond, plan=self.plan, clean=x_gt)
        pred = self.model.x0(x_n, self._sig(n, x_gt), batch.cond, plan=self.plan, clean=x_gt)
        err = (pred - target).pow(2)  # [B, F, C, H, W]
        if self.motion[0] > 0:  # weighted as the teacher was (diffusion.motion_weights), not to lose its control
            err = err * motion_weights(x_gt, *self.motion)
        loss = err.mean()
        return {"model": (loss, {"loss": loss.item()})}
