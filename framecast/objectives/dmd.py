"""Stage 3: asymmetric DMD with self-rollout (Self Forcing, kept unchanged by Causal Forcing; method.md §7).

Networks: the causal few-step generator G (role `model`), a bidirectional fake score / critic (role
`critic`, initialised from the bidirectional base, method.md §7.1) and the frozen bidirectional real score.

Self-rollout (method.md §7.2). The generator streams the whole video through `rollout` with the `few_step`
sampler and its KV cache under the `SelfRollout` gradient policy: one random exit step e per iteration shared
by all blocks (the first block draws its own e0 for its own schedule, method.md §7.6), only the exit forward
keeps grad, the context is committed without grad. The data are never used: DMD is data-free (method.md §12.19).

Generator loss (method.md §7.3), one sigma per video, s = clamp(shift(U{0..999}/1000), min, max):

    x_s = (1 - s) x~ + s eps;   x_fake = D_fake(x_s, s);   x_real = cfg(D_real(x_s, s))        no grad
    g   = (x_fake - x_real) / mean_{F,C,H,W} |x~ - x_real|                                     per video
    L_G = 0.5 mean (x~ - sg(x~ - g))^2              =>  dL_G / dx~ = g / numel

Critic loss (method.md §7.4): flow matching on the detached rollout, mean (v_fake(x_s, s) - (eps - x~))^2.

Causal scores (`dmd.score_kind: causal`; docs/world_model.md, "DMD with the AR teacher as the real score"). Where
the bidirectional base is a weak teacher (a world model whose base barely follows its actions), both scores can
be causal networks run under the teacher-forcing plan: each noisy frame x_s[i] attends to the rollout's own clean
frames x~[<i]. The real score is then the AR teacher's p(x_i | x_<i) and the critic learns the generator's
p_G(x_i | x_<i), so by the chain rule of KL the gradient is the per-frame conditional term of
KL(p_G || p) = sum_i E KL(p_G(x_i | x_<i) || p(x_i | x_<i)), with the context held fixed (its own path through later
frames is not followed, as the self-rollout already commits the context without grad).

Schedule (method.md §7.5): every step trains the critic; every `critic_ratio`-th step (step % ratio == 0) also
trains the generator. Here both use the same rollout in a generator step (the reference draws a second
batch for the critic), which saves one rollout per generator step on CPU. The trainer steps only the
optimisers whose names a step returns, and updates the generator's EMA only on its own steps.
"""

from __future__ import annotations

import torch

from .. import rng
from ..errors import ConfigError
from .. import flow
from ..data.batch import Batch
from ..models.attention import AttentionPlan
from ..models.backbone import BIDIRECTIONAL
from ..models.denoiser import Guidance
from ..rollout import SelfRollout, generate
from ..sampling import few_step
from . import Losses, Objective
from .consistency import freeze

Tensor = torch.Tensor


class AsymmetricDMD(Objective):
    ema_roles = ("model",)  # the critic keeps no EMA

    def __init__(self, model, critic, real, *, sigmas: Tensor, first_sigmas: Tensor | None, block_size: int,
                 shift: float, real_guidance: float, critic_ratio: int, sigma_min: float, sigma_max: float,
                 context_sigma: float = 0.0, num_train_timesteps: int = 1000, causal_scores: bool = False) -> None:
        if critic_ratio < 1:
            raise ConfigError(f"dmd.critic_ratio must be >= 1, got {critic_ratio}")
        if not 0.0 < sigma_min < sigma_max <= 1.0:
            raise ConfigError(f"need 0 < dmd.sigma_min < dmd.sigma_max <= 1, got {sigma_min}, {sigma_max}")
        self.model, self.critic, self.real = model, critic, freeze(real)
        self.sigmas, self.first_sigmas = sigmas.float(), None if first_sigmas is None else first_sigmas.float()
        self.block_size, self.shift, self.ratio = block_size, shift, critic_ratio
        self.real_guidance, self.context_sigma = real_guidance, context_sigma
        self.sigma_min, self.sigma_max, self.T = sigma_min, sigma_max, num_train_timesteps
        self.roles = {"model": model, "critic": critic}
        # how both scores see a rollout: whole (bidirectional) or frame by frame after its clean context (causal)
        self.causal_scores = causal_scores
        self.score_plan = AttentionPlan("teacher_forcing", block_size) if causal_scores else BIDIRECTIONAL

    def _score_kw(self, x: Tensor) -> dict:
        """The plan (and, when causal, the clean context: the rollout itself) of a real or fake score forward."""
        return {"plan": self.score_plan, "clean": x.detach() if self.causal_scores else None}

    def frozen_modules(self) -> dict[str, torch.nn.Module]:
        return {"real": self.real}

    def exit_steps(self, generator: torch.Generator) -> tuple[int, int | None]:
        """One exit index for every block, and its own for the first block's schedule (method.md §12.12)."""
        g = generator  # a Draws is the step's shared stream: batch-wide, the same on every rank (rng.py)
        e = int(torch.randint(0, len(self.sigmas), (1,), generator=g))
        e0 = None
        if self.first_sigmas is not None:
            e0 = int(torch.randint(0, len(self.first_sigmas), (1,), generator=g))
        return e, e0

    def self_rollout(self, batch: Batch, generator: torch.Generator) -> Tensor:
        """x~ [B, F, C, H, W]: the generator's own video, stopped at a random exit step (method.md §7.2)."""
        e, e0 = self.exit_steps(generator)
        noise = rng.randn(batch.video.shape, generator).to(batch.video)
        return generate(self.model, noise, batch.cond, sampler=few_step, sigmas=self.sigmas,
                        first_sigmas=self.first_sigmas, block_size=self.block_size,
                        self_rollout=SelfRollout(e, e0, self.context_sigma), generator=generator)

    def dmd_sigma(self, batch_size: int, generator: torch.Generator) -> Tensor:
        """[B] one level per video: shift(U{0..T-1} / T) clamped to [min, max] (method.md §7.3, §12.11)."""
        u = rng.randint(0, self.T, (batch_size,), generator).double() / self.T
        return flow.shift(u, self.shift).clamp(self.sigma_min, self.sigma_max).float()

    def _noised(self, x: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
        s = self.dmd_sigma(x.shape[0], generator).to(x.device)[:, None].expand(x.shape[:2])  # [B, F]
        eps = rng.randn(x.shape, generator).to(x)
        return flow.add_noise(x, eps, s), s, eps

    def generator_loss(self, x: Tensor, batch: Batch, generator: torch.Generator) -> tuple[Tensor, dict]:
        xs, s, _ = self._noised(x.detach(), generator)
        with torch.no_grad():
            kw = self._score_kw(x)
            x_fake = self.critic.x0(xs, s, batch.cond, **kw)  # fake score: no CFG (method.md §12.1)
            g = Guidance(self.real_guidance, batch.null) if self.real_guidance != 1.0 else None
            x_real = self.real.x0(xs, s, batch.cond, guidance=g, **kw)
            norm = (x.detach() - x_real).abs().mean(dim=(1, 2, 3, 4), keepdim=True)  # [B, 1, 1, 1, 1]
            grad = torch.nan_to_num((x_fake - x_real) / norm)
        loss = 0.5 * (x.double() - (x.detach() - grad).double()).pow(2).mean()  # float64 as the reference
        return loss.float(), {"loss": loss.item(), "grad_norm_dmd": grad.norm().item() / grad.shape[0] ** 0.5}

    def critic_loss(self, x: Tensor, batch: Batch, generator: torch.Generator) -> tuple[Tensor, dict]:
        xs, s, eps = self._noised(x.detach(), generator)
        v = self.critic.velocity(xs, s, batch.cond, **self._score_kw(x))
        loss = (v - flow.velocity_target(x.detach(), eps)).pow(2).mean()
        return loss, {"loss": loss.item()}

    def losses(self, batch: Batch, step: int, generator: torch.Generator) -> Losses:
        gen_step = step % self.ratio == 0
        with torch.set_grad_enabled(gen_step):
            x = self.self_rollout(batch, generator)
        out: Losses = {}
        if gen_step:
            out["model"] = self.generator_loss(x, batch, generator)
        out["critic"] = self.critic_loss(x, batch, generator)
        return out
