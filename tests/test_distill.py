"""Stages 2-3 (method.md §5-§7, §12): gradient routing and targets of ODE / CD / DMD, the ODE pair store, the
trainer hooks (CD target network, DMD critic), recipes and the few-step CLI.

Every model here is the `tiny` preset; the whole file runs on one intra-op thread (the tiny forwards are
dominated by thread start-up otherwise) and restores the thread count afterwards.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from framecast import config as C
from framecast import flow
from framecast import recipe as pipeline
from framecast.cli import main
from framecast.config import DataConfig
from framecast.data.batch import Batch
from framecast.data.sources import ShapesSource
from framecast.data.trajectories import FIELDS, PairSource, PairStore, PairStoreError
from framecast.data.vectors import (
    ARTeacher,
    BidirectionalTeacher,
    VectorMixture,
    VectorSource,
)
from framecast.generate import build_denoiser
from framecast.models.attention import AttentionPlan
from framecast.models.codecs import IdentityCodec
from framecast.models.conditioning import Cond, build_text_encoder
from framecast.models.denoiser import Guidance
from framecast.objectives.consistency import CausalCD
from framecast.objectives.dmd import AsymmetricDMD
from framecast.objectives.ode import ODERegression, generate_pairs, write_pairs
from framecast.recipe import train_stage
from framecast.sampling import SAMPLERS
from framecast.train import checkpoint as ckpt

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: threads only add sync cost

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
SHIFT = 5.0
TWO_STEP64 = flow.few_step_sigmas([1000, 500], SHIFT)  # exact, float64: what grids are checked against
TWO_STEP = TWO_STEP64.float()  # [1, .8333]
FOUR_STEP = flow.few_step_sigmas([1000, 750, 500, 250], SHIFT).float()  # [1, .9375, .8333, .625]




def _model(seed: int, std: float = 0.2):
    """A tiny denoiser with its own random weights (conftest's `randomise` always uses the same seed)."""
    m = build_denoiser(C.model_preset("tiny"))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return m


def _batch(B: int = 2, F: int = 3, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    return Batch(torch.randn(B, F, 3, 8, 8, generator=g), Cond(torch.randn(B, 4, 32, generator=g)),
                 Cond(torch.randn(B, 4, 32, generator=g) * 0.1), [f"v{i}" for i in range(B)])


def _params(m):
    return list(m.parameters())


def _spy_forwards(monkeypatch, model, log):
    """Record (kind, grad enabled, positions) of every network forward of `model`, where it runs (inside
    `commit`'s own no-grad): kind is "commit" for a cache write, "v" for a prediction."""
    orig = model._raw

    def raw(x, sigma, cond, **kw):
        pos = kw.get("positions")
        log.append(("commit" if kw.get("commit") else "v", torch.is_grad_enabled(),
                    None if pos is None else tuple(pos.tolist())))
        return orig(x, sigma, cond, **kw)

    monkeypatch.setattr(model, "_raw", raw)


# ================================================================================================
# CausalCD (method.md §6)
# ================================================================================================


def _cd(steps: int = 8, guidance: float = 3.0, decay: float = 0.9):
    student, teacher = _model(1).train(), _model(2)
    obj = CausalCD(student, teacher, steps=steps, shift=SHIFT, block_size=1, guidance=guidance,
                   target_decay=decay, few_step_sigmas=TWO_STEP64)
    return obj, student, teacher


def test_cd_gradients_reach_only_the_student(monkeypatch):
    obj, student, teacher = _cd()
    assert obj.target is not student and obj.target is not teacher
    assert all(p.requires_grad for p in student.parameters())
    for frozen in (teacher, obj.target):
        assert not frozen.training and all(not p.requires_grad for p in frozen.parameters())
    assert set(obj.roles) == {"model"} and obj.roles["model"] is student
    assert set(obj.state_modules()) == {"target"} and obj.state_modules()["target"] is obj.target

    seen = {}
    orig = obj.target.x0

    def spy(*a, **kw):
        seen["target"] = out = orig(*a, **kw)
        return out

    monkeypatch.setattr(obj.target, "x0", spy)
    loss = obj.losses(_batch(), 0, torch.Generator().manual_seed(0))["model"][0]
    assert loss.requires_grad and loss.item() > 0
    loss.backward()
    grads = [p.grad for p in student.parameters()]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    assert all(p.grad is None for p in _params(teacher) + _params(obj.target))
    assert not seen["target"].requires_grad and seen["target"].grad_fn is None  # the target is detached


def test_cd_teacher_and_target_run_without_grad_even_if_unfrozen():
    """The no-grad of the teacher step and the target forward does not rely on requires_grad=False."""
    obj, student, teacher = _cd()
    for p in _params(teacher) + _params(obj.target):
        p.requires_grad_(True)
    obj.losses(_batch(), 0, torch.Generator().manual_seed(0))["model"][0].backward()
    assert all(p.grad is None for p in _params(teacher) + _params(obj.target))
    assert any(p.grad is not None for p in student.parameters())


def test_cd_teacher_step_is_one_euler_step_of_the_cfg_ode():
    obj, _, teacher = _cd(guidance=3.0)
    b = _batch()
    x = torch.randn(b.video.shape, generator=torch.Generator().manual_seed(3))
    n = torch.tensor([0, 5])
    sig = flow.grid(8, SHIFT).float()
    s = sig[n][:, None].expand(2, 3)
    s1 = sig[n + 1][:, None].expand(2, 3)
    plan = AttentionPlan("teacher_forcing", 1)
    with torch.no_grad():
        v_c = teacher.velocity(x, s, b.cond, plan=plan, clean=b.video)
        v_u = teacher.velocity(x, s, b.null, plan=plan, clean=b.video)
    want = x + (s1 - s)[..., None, None, None] * (v_u + 3.0 * (v_c - v_u))
    got = obj.teacher_step(x, n, b)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    no_cfg = x + (s1 - s)[..., None, None, None] * v_c
    assert (got - no_cfg).abs().max() > 1e-3  # the guidance matters: the check above is sensitive to it
    obj1, _, _ = _cd(guidance=1.0)  # guidance 1: the conditional branch alone
    torch.testing.assert_close(obj1.teacher_step(x, n, b), no_cfg, atol=1e-5, rtol=1e-5)


def test_cd_loss_equals_the_hand_computed_consistency_target():
    obj, student, teacher = _cd(guidance=3.0)
    with torch.no_grad():  # a target network that differs from the student, as after some training
        g = torch.Generator().manual_seed(9)
        for p in obj.target.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    b = _batch()
    # a seed whose two videos draw different grid indices (one level per video, not per batch)
    seed = next(s for s in range(100)
                if len(set(torch.randint(0, 7, (2,), generator=torch.Generator().manual_seed(s)).tolist())) == 2)
    g = torch.Generator().manual_seed(seed)
    n = torch.randint(0, 7, (2,), generator=g)  # the draws of CausalCD.losses, in its order
    eps = torch.randn(b.video.shape, generator=g)
    sig = flow.grid(8, SHIFT).float()
    s_n, s_n1 = sig[n][:, None].expand(2, 3), sig[n + 1][:, None].expand(2, 3)
    plan = AttentionPlan("teacher_forcing", 1)
    with torch.no_grad():
        x_n = (1 - s_n)[..., None, None, None] * b.video + s_n[..., None, None, None] * eps
        v_c = teacher.velocity(x_n, s_n, b.cond, plan=plan, clean=b.video)
        v_u = teacher.velocity(x_n, s_n, b.null, plan=plan, clean=b.video)
        x_n1 = x_n + (s_n1 - s_n)[..., None, None, None] * (v_u + 3.0 * (v_c - v_u))
        target = obj.target.x0(x_n1, s_n1, b.cond, plan=plan, clean=b.video)
        pred = student.x0(x_n, s_n, b.cond, plan=plan, clean=b.video)
    want = (pred - target).pow(2).mean()
    loss, logs = obj.losses(b, 0, torch.Generator().manual_seed(seed))["model"]
    torch.testing.assert_close(loss.detach(), want, atol=1e-6, rtol=1e-5)
    assert logs["loss"] == pytest.approx(loss.item())
    # sensitivity: the student's own x0 at the next level is not the target
    with torch.no_grad():
        wrong = (pred - student.x0(x_n1, s_n1, b.cond, plan=plan, clean=b.video)).pow(2).mean()
    assert abs(wrong.item() - want.item()) > 1e-4 * want.item()


class _SigmaStub(torch.nn.Module):
    """A denoiser that records the sigmas it is called at; v = w x."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(0.1))
        self.sigmas: list[torch.Tensor] = []

    def velocity(self, x, sigma, cond, **kw):
        self.sigmas.append(sigma.detach().clone())
        return x * self.w

    def x0(self, x, sigma, cond, **kw):
        return flow.v_to_x0(x, self.velocity(x, sigma, cond, **kw), sigma)


def test_cd_trains_every_adjacent_pair_but_the_last():
    """n ~ U{0..N-2} per video, shared by its frames; the step N-1 -> N (to sigma 0) is never trained (§12.5)."""
    N = 4
    student, teacher = _SigmaStub(), _SigmaStub()
    obj = CausalCD(student, teacher, steps=N, shift=SHIFT, block_size=1, guidance=1.0, target_decay=0.5)
    obj.target.sigmas = []
    b = _batch(B=3, F=2)
    for seed in range(40):
        obj.losses(b, seed, torch.Generator().manual_seed(seed))
    grid = flow.grid(N, SHIFT).float()
    for stub, allowed in ((student, grid[: N - 1]), (teacher, grid[: N - 1]), (obj.target, grid[1:N])):
        s = torch.stack(stub.sigmas)  # [calls, B, F]
        assert (s == s[..., :1]).all()  # one level per video
        assert set(s.unique().tolist()) == set(allowed.tolist())
    assert (torch.stack(obj.target.sigmas) > 0).all()
    # the target is always one grid step after the student, per video
    idx = {round(v, 6): i for i, v in enumerate(grid.tolist())}
    for s_in, s_tgt in zip(student.sigmas, obj.target.sigmas):
        for a, t in zip(s_in[:, 0].tolist(), s_tgt[:, 0].tolist()):
            assert idx[round(t, 6)] == idx[round(a, 6)] + 1


def test_cd_boundary_pair_trains_the_last_step_onto_the_teachers_one_step_x0():
    """boundary_pair: n ~ U{0..N-1}; at n = N-1 the target is the teacher's Euler step to sigma 0 itself."""
    N = 4
    student, teacher = _SigmaStub(), _SigmaStub()
    obj = CausalCD(student, teacher, steps=N, shift=SHIFT, block_size=1, guidance=1.0, target_decay=0.5,
                   boundary_pair=True)
    b = _batch(B=3, F=2)
    for seed in range(40):
        obj.losses(b, seed, torch.Generator().manual_seed(seed))
    grid = flow.grid(N, SHIFT).float()
    assert set(torch.stack(student.sigmas).unique().tolist()) == set(grid[:N].tolist())  # the last pair too
    # a batch whose every video drew n = N-1: the loss is (G(x_n) - (x_n - s_{N-1} v_T(x_n)))^2
    seed = next(s for s in range(2000)
                if (torch.randint(0, N, (3,), generator=torch.Generator().manual_seed(s)) == N - 1).all())
    g = torch.Generator().manual_seed(seed)
    torch.randint(0, N, (3,), generator=g)
    eps = torch.randn(b.video.shape, generator=g)
    s = grid[N - 1]
    x_n = (1 - s) * b.video + s * eps
    with torch.no_grad():
        teacher.w.fill_(0.3)  # a teacher unlike the student (and its target): the anchored loss is not zero
        want = (flow.v_to_x0(x_n, student.w * x_n, s) - (x_n - s * teacher.w * x_n)).pow(2).mean()
    loss = obj.losses(b, 0, torch.Generator().manual_seed(seed))["model"][0]
    assert want.item() > 1e-4
    torch.testing.assert_close(loss.detach(), want, atol=1e-7, rtol=1e-5)


def test_cd_after_update_is_an_exact_ema_of_the_student():
    obj, student, _ = _cd(decay=0.75)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn(p.shape, generator=g))
    before = [p.detach().clone() for p in obj.target.parameters()]
    snap = [p.detach().clone() for p in student.parameters()]
    assert any(not torch.equal(a, b) for a, b in zip(before, snap))
    obj.after_update("model")
    for t, t0, s in zip(obj.target.parameters(), before, snap):
        torch.testing.assert_close(t.detach(), 0.75 * t0 + 0.25 * s, atol=1e-6, rtol=1e-6)
    assert all(torch.equal(p, s) for p, s in zip(student.parameters(), snap))  # the student is untouched
    assert all(not p.requires_grad for p in obj.target.parameters())


def test_cd_rejects_bad_settings():
    with pytest.raises(ValueError, match="target_decay"):
        CausalCD(_model(1), _model(2), steps=8, shift=SHIFT, block_size=1, guidance=3.0, target_decay=1.0)
    with pytest.raises(ValueError, match="not on the 5-step"):  # the few-step sigmas must lie on the grid
        CausalCD(_model(1), _model(2), steps=5, shift=SHIFT, block_size=1, guidance=3.0, target_decay=0.9,
                 few_step_sigmas=TWO_STEP64)


# ================================================================================================
# AsymmetricDMD (method.md §7)
# ================================================================================================


def _dmd(ratio: int = 2, first: bool = True, guidance: float = 4.0, causal: bool = False):
    gen, critic, real = _model(1).train(), _model(2).train(), _model(3)
    obj = AsymmetricDMD(gen, critic, real, sigmas=TWO_STEP, first_sigmas=FOUR_STEP if first else None,
                        block_size=1, shift=SHIFT, real_guidance=guidance, critic_ratio=ratio, sigma_min=0.02,
                        sigma_max=0.98, causal_scores=causal)
    return obj, gen, critic, real


def _nonzero_grads(m) -> bool:
    grads = [p.grad for p in m.parameters()]
    return all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)


def test_dmd_generator_step_routes_gradients():
    obj, gen, critic, real = _dmd(ratio=2)
    assert set(obj.roles) == {"model", "critic"} and obj.ema_roles == ("model",)
    assert all(not p.requires_grad for p in real.parameters()) and not real.training
    out = obj.losses(_batch(), 4, torch.Generator().manual_seed(0))  # 4 % 2 == 0: a generator step
    assert list(out) == ["model", "critic"]
    out["model"][0].backward()
    assert _nonzero_grads(gen)
    assert all(p.grad is None for p in _params(critic) + _params(real))
    gen_grads = [p.grad.clone() for p in gen.parameters()]
    out["critic"][0].backward()
    assert _nonzero_grads(critic)
    assert all(torch.equal(p.grad, g) for p, g in zip(gen.parameters(), gen_grads))  # critic loss: no gen grad
    assert all(p.grad is None for p in real.parameters())


def test_dmd_critic_only_steps():
    obj, gen, critic, real = _dmd(ratio=3)
    for step in (1, 2, 4, 5):
        out = obj.losses(_batch(), step, torch.Generator().manual_seed(step))
        assert list(out) == ["critic"]
        out["critic"][0].backward()
    assert _nonzero_grads(critic)
    assert all(p.grad is None for p in _params(gen) + _params(real))
    assert list(obj.losses(_batch(), 6, torch.Generator().manual_seed(0))) == ["model", "critic"]


def test_dmd_real_score_never_gets_grad_even_if_unfrozen():
    obj, gen, critic, real = _dmd(ratio=1)
    for p in real.parameters():
        p.requires_grad_(True)
    out = obj.losses(_batch(), 0, torch.Generator().manual_seed(0))
    (out["model"][0] + out["critic"][0]).backward()
    assert all(p.grad is None for p in real.parameters())
    assert _nonzero_grads(gen) and _nonzero_grads(critic)


def _dmd_draws(obj, x, g):
    """The (sigma [B, F], eps) of AsymmetricDMD._noised, replicated from the spec (§7.3, §12.11)."""
    B = x.shape[0]
    u = torch.randint(0, 1000, (B,), generator=g).double() / 1000
    s = flow.shift(u, SHIFT).clamp(0.02, 0.98).float()[:, None].expand(x.shape[:2])
    eps = torch.randn(x.shape, generator=g)
    return s, eps


def test_dmd_generator_gradient_identity():
    """dL_G / dx~ = g / numel with g = (x_fake - x_real) / mean|x~ - x_real| per video (method.md §7.3)."""
    obj, gen, critic, real = _dmd(guidance=4.0)
    b = _batch(B=2, F=3)
    x = (torch.randn(b.video.shape, generator=torch.Generator().manual_seed(4)) * 0.5).requires_grad_(True)
    loss, logs = obj.generator_loss(x, b, torch.Generator().manual_seed(11))
    loss.backward()

    s, eps = _dmd_draws(obj, x, torch.Generator().manual_seed(11))
    xd = x.detach()
    with torch.no_grad():
        xs = (1 - s)[..., None, None, None] * xd + s[..., None, None, None] * eps
        x_fake = critic.x0(xs, s, b.cond)  # the fake score: no CFG
        v_c, v_u = real.velocity(xs, s, b.cond), real.velocity(xs, s, b.null)
        x_real = xs - s[..., None, None, None] * (v_u + 4.0 * (v_c - v_u))
        norm = (xd - x_real).abs().mean(dim=(1, 2, 3, 4), keepdim=True)
        g = (x_fake - x_real) / norm
    assert (norm[0] != norm[1]).all()  # a per-video normaliser, and it differs between the videos
    torch.testing.assert_close(x.grad, g / x.numel(), atol=1e-9, rtol=1e-4)
    torch.testing.assert_close(loss.detach(), (0.5 * g.pow(2).mean()).float(), atol=1e-7, rtol=1e-4)
    assert logs["grad_norm_dmd"] == pytest.approx(g.norm().item() / 2 ** 0.5, rel=1e-4)
    assert all(p.grad is None for p in _params(critic) + _params(real))


def test_dmd_causal_scores_see_the_rollout_as_clean_context():
    """dmd.score_kind causal: both scores run under the teacher-forcing plan with the rollout as the clean copy,
    so the gradient on frame i is the hand-computed one and does not depend on frames after i."""
    obj, gen, critic, real = _dmd(guidance=4.0, causal=True)
    b = _batch(B=2, F=3)
    x0 = torch.randn(b.video.shape, generator=torch.Generator().manual_seed(4)) * 0.5
    x = x0.clone().requires_grad_(True)
    loss, _ = obj.generator_loss(x, b, torch.Generator().manual_seed(11))
    loss.backward()
    s, eps = _dmd_draws(obj, x, torch.Generator().manual_seed(11))
    tf = dict(plan=AttentionPlan("teacher_forcing", 1), clean=x0)
    with torch.no_grad():
        xs = (1 - s)[..., None, None, None] * x0 + s[..., None, None, None] * eps
        x_fake = critic.x0(xs, s, b.cond, **tf)
        v_c, v_u = real.velocity(xs, s, b.cond, **tf), real.velocity(xs, s, b.null, **tf)
        x_real = xs - s[..., None, None, None] * (v_u + 4.0 * (v_c - v_u))
        g = (x_fake - x_real) / (x0 - x_real).abs().mean(dim=(1, 2, 3, 4), keepdim=True)
        bi = critic.x0(xs, s, b.cond)  # what the bidirectional plan would have scored
    torch.testing.assert_close(x.grad, g / x.numel(), atol=1e-9, rtol=1e-4)
    assert not torch.allclose(bi, x_fake, atol=1e-3)  # the plan is really in use

    # causality: a change to the last frame leaves the fake and real scores of the earlier frames unchanged
    x1 = x0.clone()
    x1[:, -1] += 1.0
    xs1 = xs.clone()
    xs1[:, -1] += 1.0
    with torch.no_grad():
        f0 = critic.x0(xs, s, b.cond, plan=tf["plan"], clean=x0)
        f1 = critic.x0(xs1, s, b.cond, plan=tf["plan"], clean=x1)
    torch.testing.assert_close(f0[:, :-1], f1[:, :-1], atol=1e-6, rtol=1e-5)
    assert not torch.allclose(f0[:, -1], f1[:, -1], atol=1e-3)

    # the critic learns the generator's conditionals: flow matching under the same plan
    closs, _ = obj.critic_loss(x0, b, torch.Generator().manual_seed(2))
    s2, eps2 = _dmd_draws(obj, x0, torch.Generator().manual_seed(2))
    with torch.no_grad():
        xs2 = (1 - s2)[..., None, None, None] * x0 + s2[..., None, None, None] * eps2
        want = (critic.velocity(xs2, s2, b.cond, **tf) - (eps2 - x0)).pow(2).mean()
    torch.testing.assert_close(closs.detach(), want, atol=1e-6, rtol=1e-5)


def test_dmd_critic_loss_is_flow_matching_on_the_detached_rollout():
    obj, gen, critic, real = _dmd()
    b = _batch()
    x = torch.randn(b.video.shape, generator=torch.Generator().manual_seed(4)).requires_grad_(True)
    loss, _ = obj.critic_loss(x, b, torch.Generator().manual_seed(2))
    s, eps = _dmd_draws(obj, x, torch.Generator().manual_seed(2))
    with torch.no_grad():
        xs = (1 - s)[..., None, None, None] * x + s[..., None, None, None] * eps
        want = (critic.velocity(xs, s, b.cond) - (eps - x)).pow(2).mean()
    torch.testing.assert_close(loss.detach(), want, atol=1e-6, rtol=1e-5)
    loss.backward()
    assert x.grad is None and _nonzero_grads(critic)


def test_dmd_sigmas_are_shifted_clamped_and_per_video():
    obj, *_ = _dmd()
    s = obj.dmd_sigma(200_000, torch.Generator().manual_seed(0))
    assert s.min() >= 0.02 and s.max() <= 0.98
    assert (s == 0.98).float().mean().item() == pytest.approx(0.092, abs=0.004)  # ~9.2 % at the top (§7.3)
    assert (s == 0.02).float().mean().item() == pytest.approx(0.005, abs=0.0015)
    unclamped = s[(s > 0.02) & (s < 0.98)]
    u = unclamped * 1 / (SHIFT - (SHIFT - 1) * unclamped)  # inverse shift: back to k / 1000
    torch.testing.assert_close(u * 1000, (u * 1000).round(), atol=2e-3, rtol=0)


@pytest.mark.parametrize("seed", range(6))
def test_dmd_self_rollout_has_one_grad_forward_per_block(monkeypatch, seed):
    """Through AsymmetricDMD.losses: the exit step is each block's only forward with grad (method.md §7.2, §12.12)."""
    obj, gen, critic, real = _dmd(ratio=2)
    log: list = []
    _spy_forwards(monkeypatch, gen, log)
    g = torch.Generator().manual_seed(seed)
    e = int(torch.randint(0, len(TWO_STEP), (1,), generator=g))  # exit_steps' draws, in its order
    e0 = int(torch.randint(0, len(FOUR_STEP), (1,), generator=g))
    F = 3
    out = obj.losses(_batch(F=F), 0, torch.Generator().manual_seed(seed))
    forwards = [(grad, pos) for kind, grad, pos in log if kind == "v"]
    commits = [(grad, pos) for kind, grad, pos in log if kind == "commit"]
    for f in range(F):
        block = [grad for grad, pos in forwards if pos == (f,)]
        assert len(block) == (e0 if f == 0 else e) + 1  # the rollout stops at the exit step
        assert block == [False] * (len(block) - 1) + [True]  # only the exit forward keeps grad
    assert len(forwards) == (e0 + 1) + (F - 1) * (e + 1)
    assert commits and all(not grad for grad, _ in commits)  # the context is committed without grad
    assert out["model"][0].requires_grad

    log.clear()  # a critic-only step: the rollout keeps no grad at all
    out = obj.losses(_batch(F=F), 1, torch.Generator().manual_seed(seed))
    assert log and all(not grad for _, grad, _ in log)
    assert out["critic"][0].grad_fn is not None  # the critic still trains


def test_dmd_rejects_bad_settings():
    with pytest.raises(ValueError, match="critic_ratio"):
        AsymmetricDMD(_model(1), _model(2), _model(3), sigmas=TWO_STEP, first_sigmas=None, block_size=1,
                      shift=SHIFT, real_guidance=4.0, critic_ratio=0, sigma_min=0.02, sigma_max=0.98)
    with pytest.raises(ValueError, match="dmd.sigma_min"):
        AsymmetricDMD(_model(1), _model(2), _model(3), sigmas=TWO_STEP, first_sigmas=None, block_size=1,
                      shift=SHIFT, real_guidance=4.0, critic_ratio=5, sigma_min=0.5, sigma_max=0.4)


# ================================================================================================
# ODERegression (method.md §5.2, §11)
# ================================================================================================


def _ode_batch(B=3, A=2, F=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    states = torch.randn(B, A, F, 3, 8, 8, generator=g)
    b = Batch(torch.randn(B, F, 3, 8, 8, generator=g), Cond(torch.randn(B, 4, 32, generator=g)),
              Cond(torch.zeros(B, 4, 32)), [""] * B,
              {"states": states, "endpoint": torch.randn(B, F, 3, 8, 8, generator=g)})
    return b


def _record_velocity(monkeypatch, model):
    calls = []
    orig = model.velocity

    def spy(x, sigma, cond, **kw):
        v = orig(x, sigma, cond, **kw)
        calls.append({"x": x.detach().clone(), "sigma": sigma.detach().clone(), "v": v.detach().clone(), **kw})
        return v

    monkeypatch.setattr(model, "velocity", spy)
    return calls


@pytest.mark.parametrize("kind", ["causal", "bidirectional"])
def test_ode_regression_inputs_context_and_plan(monkeypatch, kind):
    K, anchors = 2, TWO_STEP
    model = _model(1).train()
    obj = ODERegression(model, anchors=anchors, block_size=K, teacher_kind=kind)
    calls = _record_velocity(monkeypatch, model)
    mixed = 0
    for seed in range(12):
        b = _ode_batch(seed=seed)
        loss = obj.losses(b, 0, torch.Generator().manual_seed(seed))["model"][0]
        c = calls[-1]
        sigma, x = c["sigma"], c["x"]  # [B, F], [B, F, C, H, W]
        j = torch.stack([(sigma == a).long() * i for i, a in enumerate(anchors.tolist())]).sum(0)
        assert torch.isin(sigma, anchors).all()
        for bi in range(3):
            for f in range(4):
                assert torch.equal(x[bi, f], b.extra["states"][bi, j[bi, f], f])  # the stored state at its anchor
        if kind == "causal":  # one anchor per video, for all frames; clean GT context, TF plan
            assert (sigma == sigma[:, :1]).all()
            assert c["clean"] is b.video
            assert c["plan"] == AttentionPlan("teacher_forcing", K)
        else:  # one anchor per block, the noisy trajectory as context, block-causal plan, no clean copy
            blocks = sigma.view(3, 2, K)
            assert (blocks == blocks[..., :1]).all()
            mixed += int((blocks[:, 0, 0] != blocks[:, 1, 0]).any())
            assert c["clean"] is None
            assert c["plan"] == AttentionPlan("block_causal", K)
        x0 = x - sigma[..., None, None, None] * c["v"]
        torch.testing.assert_close(loss.detach(), (x0 - b.extra["endpoint"]).pow(2).mean(), atol=1e-6, rtol=1e-5)
    if kind == "bidirectional":
        assert mixed > 0  # independent draws per block do differ
    # both anchors are used over the draws
    assert set(torch.cat([c["sigma"].flatten() for c in calls]).tolist()) == set(anchors.tolist())
    loss.backward()
    assert _nonzero_grads(model)


def test_ode_regression_checks_the_store_layout():
    obj = ODERegression(_model(1), anchors=FOUR_STEP, block_size=1)
    with pytest.raises(ValueError, match="2 anchors"):
        obj.losses(_ode_batch(A=2), 0, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="unknown ode.teacher_kind"):
        ODERegression(_model(1), anchors=FOUR_STEP, block_size=1, teacher_kind="ar")


# ================================================================================================
# ODE pair store (data/trajectories.py + objectives/ode.py write_pairs), method.md §5.1, §12.4
# ================================================================================================

PAIR_KW = dict(block_size=1, steps=8, shift=SHIFT, anchors=TWO_STEP64, guidance=3.0, seed=3, progress=False)
MANIFEST = {"teacher": "tiny-seed-2", "teacher_kind": "causal", "grid_steps": 8, "shift": SHIFT,
            "anchors": TWO_STEP64.tolist(), "guidance": 3.0, "block_size": 1, "num_pairs": 5, "shard_size": 2,
            "seed": 3}


def _shapes_source() -> ShapesSource:
    return ShapesSource(DataConfig(num_frames=4, height=16, width=16),
                        build_text_encoder("hash", 32, 8, 0), IdentityCodec(3))


@pytest.fixture(scope="module")
def _pair_store_master(tmp_path_factory):
    root = tmp_path_factory.mktemp("pairs") / "store"
    write_pairs(PairStore(root, MANIFEST), _model(2).eval(), _shapes_source(), **PAIR_KW)
    return root


@pytest.fixture
def pair_store(_pair_store_master, tmp_path):
    """A private copy of a finished 3-shard store (5 pairs, shards of 2, 2, 1) made by the tiny teacher."""
    root = tmp_path / "store"
    shutil.copytree(_pair_store_master, root)
    return root


def test_write_pairs_fills_every_shard_with_the_teacher_solution(pair_store):
    store = PairStore(pair_store, MANIFEST)
    assert store.num_shards == 3 and store.missing() == []
    assert json.loads((pair_store / "manifest.json").read_text()) == json.loads(json.dumps(MANIFEST))
    teacher, source = _model(2).eval(), _shapes_source()
    for i, n in enumerate((2, 2, 1)):
        with safe_open(str(store.shard_path(i)), framework="pt") as f:
            t = {k: f.get_tensor(k) for k in FIELDS}
            captions = json.loads(f.metadata()["captions"])
        g = torch.Generator().manual_seed(3 * 1_000_003 + i)  # shard i draws from Generator(seed, i) only
        batch = source.batch(n, g)
        noise = torch.randn(batch.video.shape, generator=g)
        assert t["states"].shape == (n, 2, 4, 3, 16, 16) and t["endpoint"].shape == (n, 4, 3, 16, 16)
        assert torch.equal(t["clean"], batch.video) and captions == batch.captions
        assert torch.equal(t["text"], batch.cond.text) and torch.equal(t["null"], batch.null.text)
        assert torch.equal(t["states"][:, 0], noise)  # anchor sigma 1 is the starting noise
        # the stored (cached, block-wise) solution equals the packed teacher-forcing solve with CFG
        packed = generate_pairs(teacher, batch.video, batch.cond, noise, block_size=1, steps=8, shift=SHIFT,
                                anchors=TWO_STEP64, guidance=Guidance(3.0, batch.null), mode="packed")
        torch.testing.assert_close(t["states"], packed.states, atol=1e-4, rtol=0)
        torch.testing.assert_close(t["endpoint"], packed.endpoint, atol=1e-4, rtol=0)
        assert (t["endpoint"] - t["clean"]).abs().max() > 1e-2  # the target is the ODE endpoint, not the GT


def test_pair_generation_resumes_bit_for_bit_and_never_overwrites(pair_store):
    store = PairStore(pair_store, MANIFEST)
    paths = [store.shard_path(i) for i in range(3)]
    original = [p.read_bytes() for p in paths]
    stamps = [p.stat().st_mtime_ns for p in paths]
    paths[1].unlink()
    resumed = PairStore(pair_store, MANIFEST)
    assert resumed.missing() == [1]
    write_pairs(resumed, _model(2).eval(), _shapes_source(), **PAIR_KW)
    assert resumed.missing() == []
    assert paths[1].read_bytes() == original[1]  # the regenerated shard is the original, bit for bit
    assert [p.read_bytes() for p in paths] == original
    assert [paths[0].stat().st_mtime_ns, paths[2].stat().st_mtime_ns] == [stamps[0], stamps[2]]  # untouched
    assert not list(pair_store.glob(".*.tmp"))
    # a complete store is left alone by another run, and an explicit write refuses to replace a shard
    write_pairs(resumed, _model(5).eval(), _shapes_source(), **PAIR_KW)
    assert [p.read_bytes() for p in paths] == original
    fake = {k: torch.zeros(2, *v.shape[1:]) for k, v in PairStore(pair_store, MANIFEST).load()[0].items()}
    with pytest.raises(PairStoreError, match="refusing to overwrite"):
        resumed.write(0, fake, ["a", "b"])
    assert paths[0].read_bytes() == original[0]


def test_an_incomplete_store_is_refused(pair_store):
    store = PairStore(pair_store, MANIFEST)
    store.shard_path(2).unlink()
    with pytest.raises(PairStoreError, match=r"lacks shards \[2\]"):
        PairSource(store)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty", "no_captions"])
def test_a_corrupt_shard_names_the_file(pair_store, damage):
    store = PairStore(pair_store, MANIFEST)
    path = store.shard_path(1)
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) - 100])
    elif damage == "garbage":
        path.write_bytes(b"\xff" * 64)
    elif damage == "empty":
        path.write_bytes(b"")
    else:  # a valid safetensors file whose metadata lacks the captions
        with safe_open(str(path), framework="pt") as f:
            t = {k: f.get_tensor(k) for k in FIELDS}
        save_file(t, str(path), metadata={"other": "x"})
    with pytest.raises(PairStoreError) as e:
        PairSource(PairStore(pair_store, MANIFEST))
    msg = str(e.value)
    assert str(path) in msg and "corrupt" in msg and "\n" not in msg
    # the message's advice works: re-running does not touch the bad shard, deleting it regenerates it
    bad = path.read_bytes()
    write_pairs(PairStore(pair_store, MANIFEST), _model(2).eval(), _shapes_source(), **PAIR_KW)
    assert path.read_bytes() == bad
    path.unlink()
    write_pairs(PairStore(pair_store, MANIFEST), _model(2).eval(), _shapes_source(), **PAIR_KW)
    assert path.read_bytes() == data
    assert PairSource(PairStore(pair_store, MANIFEST)).size == 5


def test_a_shard_without_metadata_names_the_file(pair_store):
    store = PairStore(pair_store, MANIFEST)
    path = store.shard_path(0)
    with safe_open(str(path), framework="pt") as f:
        t = {k: f.get_tensor(k) for k in FIELDS}
    save_file(t, str(path))  # no header metadata at all
    with pytest.raises(PairStoreError, match=str(path)):
        PairSource(PairStore(pair_store, MANIFEST))


@pytest.mark.parametrize("key, value", [("guidance", 6.0), ("teacher_kind", "bidirectional"),
                                        ("anchors", FOUR_STEP.double().tolist()), ("num_pairs", 6),
                                        ("extra_key", 1)])
def test_a_store_made_otherwise_is_refused_naming_the_key(pair_store, key, value):
    before = {p.name: p.read_bytes() for p in pair_store.iterdir()}
    with pytest.raises(PairStoreError) as e:
        PairStore(pair_store, {**MANIFEST, key: value})
    msg = str(e.value)
    assert f"made with {key}=" in msg and "ode.pairs_dir" in msg and "\n" not in msg
    assert {p.name: p.read_bytes() for p in pair_store.iterdir()} == before
    (pair_store / "manifest.json").write_text('{"teacher": ')
    with pytest.raises(PairStoreError, match="manifest.json is corrupt"):
        PairStore(pair_store, MANIFEST)


def test_pair_source_batches(pair_store):
    store = PairStore(pair_store, MANIFEST)
    tensors, captions = store.load()
    src = PairSource(store)
    a = src.batch(4, torch.Generator().manual_seed(0))
    assert a.video.shape == (4, 4, 3, 16, 16) and a.extra["states"].shape == (4, 2, 4, 3, 16, 16)
    assert a.extra["endpoint"].shape == (4, 4, 3, 16, 16)
    assert a.cond.text.shape == (4, 8, 32) and a.null.text.shape == (4, 8, 32) and len(a.captions) == 4
    idx = torch.randint(0, 5, (4,), generator=torch.Generator().manual_seed(0))
    assert torch.equal(a.video, tensors["clean"][idx]) and torch.equal(a.extra["states"], tensors["states"][idx])
    assert torch.equal(a.extra["endpoint"], tensors["endpoint"][idx])
    assert torch.equal(a.cond.text, tensors["text"][idx]) and torch.equal(a.null.text, tensors["null"][idx])
    assert a.captions == [captions[i] for i in idx.tolist()]
    b = src.batch(4, torch.Generator().manual_seed(0))  # deterministic given the generator
    assert torch.equal(a.video, b.video) and torch.equal(a.extra["states"], b.extra["states"])
    assert a.captions == b.captions
    c = src.batch(4, torch.Generator().manual_seed(1))
    assert not torch.equal(a.extra["states"], c.extra["states"])


def _vector_pairs(root, teacher, kind, mix, n=128):
    manifest = {"teacher": kind, "teacher_kind": kind, "grid_steps": 48, "anchors": FOUR_STEP.double().tolist(),
                "num_pairs": n, "shard_size": n // 2, "seed": 0}
    store = PairStore(root, manifest)
    write_pairs(store, teacher, VectorSource(mix, 4, 1), block_size=1, steps=48, shift=SHIFT,
                anchors=flow.few_step_sigmas([1000, 750, 500, 250], SHIFT), guidance=1.0, seed=0,
                teacher_kind=kind, progress=False)
    return store.load()[0]


def test_bidirectional_teacher_pairs_are_a_joint_solve(tmp_path):
    """Self-Forcing-baseline pairs: one packed bidirectional Euler solve of the whole video (P1 Lemma 3.2),
    unlike the causal pairs of the AR teacher conditioned on the ground truth (method.md §5.1)."""
    mix = VectorMixture.toy_a(num_frames=3)
    bi = _vector_pairs(tmp_path / "bi", BidirectionalTeacher(mix), "bidirectional", mix)
    ar = _vector_pairs(tmp_path / "ar", ARTeacher(mix), "causal", mix)
    assert torch.equal(bi["clean"], ar["clean"]) and torch.equal(bi["states"][:, 0], ar["states"][:, 0])

    teacher, sig = BidirectionalTeacher(mix), flow.grid(48, SHIFT).float()
    keep = flow.grid_indices(flow.few_step_sigmas([1000, 750, 500, 250], SHIFT), 48, SHIFT)
    assert keep == [0, 12, 24, 36]
    for i in range(2):
        g = torch.Generator().manual_seed(i)  # seed 0: shard i uses Generator(0 * 1_000_003 + i)
        clean = VectorSource(mix, 4, 1).batch(64, g).video
        x = torch.randn(clean.shape, generator=g)
        states = []
        for n in range(48):
            if n in keep:
                states.append(x)
            s, s1 = torch.full(x.shape[:2], float(sig[n])), torch.full(x.shape[:2], float(sig[n + 1]))
            x = x + (s1 - s)[..., None, None, None] * teacher.velocity(x, s, None)
        rows = slice(64 * i, 64 * (i + 1))
        assert torch.equal(bi["clean"][rows], clean)
        torch.testing.assert_close(bi["states"][rows], torch.stack(states, 1), atol=1e-6, rtol=0)
        torch.testing.assert_close(bi["endpoint"][rows], x, atol=1e-6, rtol=0)

    assert (bi["endpoint"] - ar["endpoint"]).abs().max() > 1.0  # different pairs: modes flip
    gt_sign = bi["clean"][:, 0].sign()  # [n, 1, 1, 1]
    ar_follow = (ar["endpoint"][:, 1:].sign() == gt_sign[:, None]).float().mean().item()
    bi_follow = (bi["endpoint"][:, 1:].sign() == gt_sign[:, None]).float().mean().item()
    bi_joint = (bi["endpoint"].sign() == bi["endpoint"][:, :1].sign()).float().mean().item()
    assert ar_follow > 0.99  # the AR teacher continues the ground-truth prefix
    assert bi_joint > 0.99 and 0.25 < bi_follow < 0.75  # one joint mode, picked by the noise, not by the GT


# ================================================================================================
# Trainer hooks and resume through recipe.train_stage
# ================================================================================================

FEW = ["cd.grid_steps=8", "ode.grid_steps=8", "few_step.denoising_steps=[1000,500]"]


def tiny(out, *extra) -> C.RunConfig:
    return C.load(TINY, [f"out_dir={out}", "train.progress=false", *extra])


@pytest.fixture(scope="module")
def base_ckpts(tmp_path_factory):
    """stage0 (bidirectional base), stage1 (AR teacher) and a cd checkpoint, 2 steps each."""
    out = tmp_path_factory.mktemp("base")
    p0 = train_stage(tiny(out, "stage=stage0", "train.steps=2"))
    p1 = train_stage(tiny(out, "stage=stage1", f"init={p0}", "train.steps=2"))
    pcd = train_stage(tiny(out, "stage=cd", f"init={p1}", f"cd.teacher={p1}", "train.steps=2", *FEW))
    return {"stage0": p0, "stage1": p1, "cd": pcd}


def _sd(path, stem="model"):
    return ckpt.load_state_dict(ckpt.resolve(path), stem)


def _equal(a, b) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_cd_resume_is_exact_for_the_student_and_the_target_network(tmp_path, base_ckpts):
    p1 = base_ckpts["stage1"]
    cd = ["stage=cd", f"init={p1}", f"cd.teacher={p1}", *FEW]
    straight = tiny(tmp_path, "name=a", "train.steps=4", *cd)
    train_stage(straight)
    train_stage(tiny(tmp_path, "name=b", "train.steps=2", *cd))
    resumed = tiny(tmp_path, "name=b", "train.steps=4", *cd)
    train_stage(resumed)
    assert sorted(p.name for p in (resumed.run_dir / "ckpt").glob("step_*")) == ["step_0000002", "step_0000004"]
    a, b = ckpt.resolve(straight.run_dir), ckpt.resolve(resumed.run_dir)
    assert sorted(f.name for f in b.glob("*.safetensors")) == ["model.safetensors", "obj_target.safetensors"]
    assert ckpt.read_meta(b)["roles"] == ["model"]
    assert _equal(_sd(a), _sd(b))
    assert _equal(_sd(a, "obj_target"), _sd(b, "obj_target"))  # the target network resumes too
    init = _sd(p1)
    assert not _equal(_sd(b, "obj_target"), _sd(b)) and not _equal(_sd(b, "obj_target"), init)


def test_cd_target_moves_after_each_student_update(tmp_path, base_ckpts):
    """Trainer hook order: optimiser step, then target <- d target + (1 - d) student (method.md §6)."""
    p1 = base_ckpts["stage1"]
    cfg = tiny(tmp_path, "stage=cd", f"init={p1}", f"cd.teacher={p1}", "train.steps=1",
               "cd.target_decay=0.5", *FEW)
    path = train_stage(cfg)
    init, student, target = _sd(p1), _sd(path), _sd(path, "obj_target")
    assert not _equal(init, student)
    for k in init:
        torch.testing.assert_close(target[k], 0.5 * init[k] + 0.5 * student[k], atol=1e-6, rtol=1e-6)


def test_dmd_checkpoint_critic_ema_and_optimisers(tmp_path, base_ckpts):
    p0, pcd = base_ckpts["stage0"], base_ckpts["cd"]
    cfg = tiny(tmp_path, "stage=dmd", f"init={pcd}", f"dmd.real={p0}", f"dmd.critic={p0}",
               "train.steps=2", "train.ckpt_every=1", "train.ema_decay=0.9", "dmd.critic_ratio=2",
               "few_step.denoising_steps=[1000,500]", "dmd.critic_lr=3.0e-4", "dmd.critic_betas=[0.5,0.9]",
               "train.betas=[0.8,0.95]")
    path = train_stage(cfg)
    files = sorted(f.name for f in path.glob("*.safetensors"))
    assert files == ["critic.safetensors", "ema_model.safetensors", "model.safetensors"]  # no ema_critic
    meta = ckpt.read_meta(path)
    assert meta["roles"] == ["critic", "model"] and meta["ema"] == ["model"]
    groups = {n: o["param_groups"][0] for n, o in ckpt.load_state(path)["optimizers"].items()}
    assert groups["critic"]["lr"] == pytest.approx(3.0e-4) and tuple(groups["critic"]["betas"]) == (0.5, 0.9)
    assert groups["model"]["lr"] == pytest.approx(1.0e-3) and tuple(groups["model"]["betas"]) == (0.8, 0.95)

    # schedule (method.md §7.5): step 0 trains generator + critic, step 1 only the critic
    rows = [json.loads(x) for x in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert "model/loss" in rows[0] and "critic/loss" in rows[0]
    assert "model/loss" not in rows[1] and "critic/loss" in rows[1]
    s1, s2 = cfg.run_dir / "ckpt" / "step_0000001", path
    assert _equal(_sd(s1), _sd(s2))  # no generator update on a critic-only step
    assert not _equal(_sd(s1, "critic"), _sd(s2, "critic"))
    assert not _equal(_sd(p0), _sd(s1, "critic"))  # the critic starts from stage0 and trains
    # the generator EMA is created as a copy at its first update (step 0's generator step, method.md §7.5) and
    # the critic-only step 1 does not move it: ema == model after step 0, not a mix with the init
    init, model, ema = _sd(pcd), _sd(s2), _sd(s2, "ema_model")
    assert not _equal(init, model)
    for k in init:
        torch.testing.assert_close(ema[k], model[k], atol=0, rtol=0)


def test_dmd_resume_is_exact(tmp_path, base_ckpts):
    p0, pcd = base_ckpts["stage0"], base_ckpts["cd"]
    dmd = ["stage=dmd", f"init={pcd}", f"dmd.real={p0}", f"dmd.critic={p0}", "dmd.critic_ratio=2",
           "few_step.denoising_steps=[1000,500]", "few_step.first_block_steps=[1000,750,500,250]",
           "train.ema_decay=0.5"]
    a = tiny(tmp_path, "name=a", "train.steps=3", *dmd)
    train_stage(a)
    train_stage(tiny(tmp_path, "name=b", "train.steps=2", *dmd))
    b = tiny(tmp_path, "name=b", "train.steps=3", *dmd)
    train_stage(b)
    for stem in ("model", "critic", "ema_model"):
        assert _equal(_sd(a.run_dir, stem), _sd(b.run_dir, stem)), stem


def test_dmd_with_causal_scores_trains_from_the_ar_teacher(tmp_path, base_ckpts):
    """dmd.score_kind causal loads the AR teacher as the real score and the critic's start, refuses a base."""
    p0, p1, pcd = base_ckpts["stage0"], base_ckpts["stage1"], base_ckpts["cd"]
    dmd = ["stage=dmd", f"init={pcd}", "dmd.score_kind=causal", "dmd.critic_ratio=2", "train.steps=2",
           "few_step.denoising_steps=[1000,500]"]
    path = train_stage(tiny(tmp_path, "name=a", f"dmd.real={p1}", f"dmd.critic={p1}", *dmd))
    assert not _equal(_sd(p1), _sd(path, "critic"))  # the critic starts from the AR teacher and trains
    assert set(_sd(path, "critic")) == set(_sd(p1))
    for bad in (f"dmd.real={p0}", f"dmd.critic={p0}"):
        other = f"dmd.critic={p1}" if "real" in bad else f"dmd.real={p1}"
        with pytest.raises(C.ConfigError, match=bad.split("=")[0] + ".*causal"):
            train_stage(tiny(tmp_path, "name=b", bad, other, *dmd))
    assert not (tmp_path / "b").exists() or not list((tmp_path / "b").rglob("step_*"))
    with pytest.raises(C.ConfigError, match="score_kind"):
        tiny(tmp_path, "stage=dmd", "dmd.score_kind=ar")


def test_distill_misconfiguration_errors_are_clear(tmp_path, base_ckpts):
    p0, p1, pcd = base_ckpts["stage0"], base_ckpts["stage1"], base_ckpts["cd"]
    with pytest.raises(C.ConfigError, match="bidirectional") as e:
        train_stage(tiny(tmp_path, "stage=dmd", f"init={pcd}", f"dmd.real={p1}", f"dmd.critic={p0}"))
    assert "dmd.real" in str(e.value)
    with pytest.raises(C.ConfigError, match="dmd.critic.*bidirectional"):
        train_stage(tiny(tmp_path, "stage=dmd", f"init={pcd}", f"dmd.real={p0}", f"dmd.critic={p1}"))
    with pytest.raises(C.ConfigError, match="dmd.real"):
        train_stage(tiny(tmp_path, "stage=dmd", f"init={pcd}", f"dmd.critic={p0}"))
    with pytest.raises(C.ConfigError, match="init="):
        train_stage(tiny(tmp_path, "stage=cd", f"cd.teacher={p1}", *FEW))
    with pytest.raises(C.ConfigError, match="cd.teacher"):
        train_stage(tiny(tmp_path, "stage=cd", f"init={p1}", *FEW))
    with pytest.raises(C.ConfigError, match="cd.teacher.*causal"):
        train_stage(tiny(tmp_path, "stage=cd", f"init={p1}", f"cd.teacher={p0}", *FEW))
    with pytest.raises(C.ConfigError, match="init="):
        train_stage(tiny(tmp_path, "stage=ode", f"ode.teacher={p1}", *FEW))
    with pytest.raises(C.ConfigError, match="ode.teacher_kind"):
        train_stage(tiny(tmp_path, "stage=ode", f"init={p1}", f"ode.teacher={p1}",
                         "ode.teacher_kind=ar", *FEW))
    assert not list(tmp_path.rglob("step_*"))  # nothing was trained


def test_ode_stage_reuses_its_pairs_and_refuses_another_store(tmp_path, base_ckpts):
    p1 = base_ckpts["stage1"]
    ode = ["stage=ode", f"init={p1}", f"ode.teacher={p1}", "ode.num_pairs=3", "ode.shard_size=2",
           f"ode.pairs_dir={tmp_path / 'pairs'}", *FEW]
    train_stage(tiny(tmp_path, "name=a", "train.steps=1", *ode))
    shards = sorted((tmp_path / "pairs").glob("shard_*.safetensors"))
    assert len(shards) == 2
    before = [(p.read_bytes(), p.stat().st_mtime_ns) for p in shards]
    manifest = json.loads((tmp_path / "pairs" / "manifest.json").read_text())
    assert manifest["anchors"] == TWO_STEP64.tolist() and manifest["teacher"] == str(ckpt.resolve(p1))
    path = train_stage(tiny(tmp_path, "name=b", "train.steps=1", *ode))  # another run on the same store
    assert [(p.read_bytes(), p.stat().st_mtime_ns) for p in shards] == before
    assert ckpt.read_meta(path)["sampling"]["sigmas"] == pytest.approx(TWO_STEP64.tolist())
    with pytest.raises(PairStoreError, match="made with guidance="):
        train_stage(tiny(tmp_path, "name=c", "train.steps=1", "ode.guidance=2.0", *ode))


# ================================================================================================
# Recipes (recipe.run_recipe) and the few-step CLI
# ================================================================================================

RECIPE_HEAD = """name: rc
base: {base}
stages:
  stage0: {{train: {{steps: 2}}}}
  stage1: {{train: {{steps: 2}}}}
"""
RECIPE_TAIL = """  ode: {train: {steps: 2}, ode: {num_pairs: 3, shard_size: 2, grid_steps: 8}, few_step: {denoising_steps: [1000, 500]}}
  cd: {init: "@stage1", train: {steps: 2}, cd: {grid_steps: 8}, few_step: {denoising_steps: [1000, 500]}}
  dmd: {train: {steps: 3}, few_step: {denoising_steps: [1000, 500], first_block_steps: [1000, 750, 500, 250]}, dmd: {critic_ratio: 2}}
"""
KEYS = ["stage0", "stage1", "ode", "cd", "dmd"]


def _files(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def recipe_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipe")
    recipe = root / "rc.yaml"
    recipe.write_text(RECIPE_HEAD.format(base=TINY) + RECIPE_TAIL)
    out = root / "runs"
    results = pipeline.run_recipe(recipe, [], out_dir=str(out))
    return recipe, out, results


def test_recipe_runs_every_stage_with_few_step_checkpoints(recipe_run):
    recipe, out, results = recipe_run
    assert [r.key for r in results] == KEYS and not any(r.reused for r in results)
    by = {r.key: r for r in results}
    for r in results:
        run = out / "rc" / r.key
        assert r.ckpt == ckpt.resolve(run) and r.ckpt.name == f"step_{r.cfg.train.steps:07d}"
        assert (run / "samples" / f"step_{r.cfg.train.steps:07d}.gif").is_file(), r.key
        sm = ckpt.read_meta(r.ckpt)["sampling"]
        if r.key in ("stage0", "stage1"):
            assert sm["sampler"] == "euler" and not sm["few_step"] and "sigmas" not in sm
            continue
        assert sm["sampler"] == "few_step" and sm["few_step"] and sm["steps"] == 2 and sm["guidance"] == 1.0
        assert sm["sigmas"] == pytest.approx([1.0, 5 / 6]) and sm["causal"] and sm["mode"] == "teacher_forcing"
        if r.key == "dmd":
            assert sm["first_sigmas"] == pytest.approx([1.0, 0.9375, 5 / 6, 0.625])
        else:
            assert sm["first_sigmas"] is None
    # the references: init = previous stage unless named, teachers = stage1, real/critic = stage0
    s = {k: str(by[k].ckpt) for k in KEYS}
    assert by["stage1"].cfg.init == s["stage0"]
    assert by["ode"].cfg.init == s["stage1"] and by["ode"].cfg.ode.teacher == s["stage1"]
    assert by["cd"].cfg.init == s["stage1"] and by["cd"].cfg.cd.teacher == s["stage1"]  # "@stage1"
    assert by["dmd"].cfg.init == s["cd"]
    assert by["dmd"].cfg.dmd.real == s["stage0"] and by["dmd"].cfg.dmd.critic == s["stage0"]
    assert len(list((out / "rc" / "ode" / "pairs").glob("shard_*.safetensors"))) == 2
    rows = [json.loads(x) for x in (out / "rc" / "dmd" / "metrics.jsonl").read_text().splitlines()]
    assert ["model/loss" in r for r in rows] == [True, False, True]  # critic_ratio 2


def test_recipe_rerun_reuses_every_stage(recipe_run, monkeypatch):
    recipe, out, first = recipe_run
    before = _files(out)

    def no_training(cfg):
        raise AssertionError(f"stage {cfg.stage} was trained again")

    monkeypatch.setattr(pipeline, "train_stage", no_training)
    again = pipeline.run_recipe(recipe, [], out_dir=str(out))
    assert [r.key for r in again] == KEYS and all(r.reused for r in again)
    assert [r.ckpt for r in again] == [r.ckpt for r in first]
    assert [r.cfg for r in again] == [r.cfg for r in first]
    assert _files(out) == before


def test_recipe_refuses_to_overwrite_a_finished_stage(recipe_run, monkeypatch):
    recipe, out, _ = recipe_run
    before = _files(out)
    monkeypatch.setattr(pipeline, "train_stage", lambda cfg: pytest.fail("trained"))
    with pytest.raises(ckpt.CheckpointError) as e:
        pipeline.run_recipe(recipe, ["train.lr=0.002"], out_dir=str(out))
    msg = str(e.value)
    assert "train.lr" in msg and "stage0" in msg and "finished run with other settings" in msg
    assert _files(out) == before


def test_recipe_refuses_a_changed_reference(recipe_run, monkeypatch, tmp_path):
    """cd without `init: "@stage1"` would start from the previous stage (ode): a different finished run."""
    _, out, _ = recipe_run
    changed = tmp_path / "changed.yaml"
    changed.write_text(RECIPE_HEAD.format(base=TINY) + RECIPE_TAIL.replace('init: "@stage1", ', ""))
    before = _files(out)
    monkeypatch.setattr(pipeline, "train_stage", lambda cfg: pytest.fail("trained"))
    with pytest.raises(ckpt.CheckpointError, match="rc/cd already holds a finished run"):
        pipeline.run_recipe(changed, [], out_dir=str(out))
    assert _files(out) == before


def test_recipe_error_names_a_changed_init(recipe_run, monkeypatch, tmp_path):
    _, out, _ = recipe_run
    changed = tmp_path / "changed.yaml"
    changed.write_text(RECIPE_HEAD.format(base=TINY) + RECIPE_TAIL.replace('init: "@stage1", ', ""))
    monkeypatch.setattr(pipeline, "train_stage", lambda cfg: pytest.fail("trained"))
    with pytest.raises(ckpt.CheckpointError, match=r"\binit\b"):
        pipeline.run_recipe(changed, [], out_dir=str(out))


def test_recipe_reference_to_an_unknown_stage(recipe_run, monkeypatch, tmp_path):
    _, out, _ = recipe_run
    bad = tmp_path / "bad.yaml"
    bad.write_text(RECIPE_HEAD.format(base=TINY) + '  cd: {init: "@nosuch", cd: {grid_steps: 8}}\n')
    monkeypatch.setattr(pipeline, "train_stage", lambda cfg: pytest.fail("trained"))
    with pytest.raises(C.ConfigError, match="@nosuch") as e:  # stage0 and stage1 are reused, cd fails
        pipeline.run_recipe(bad, [], out_dir=str(out))
    assert "stage0" in str(e.value) and "stage1" in str(e.value)  # it lists the stages it has


@pytest.fixture
def spy_samplers(monkeypatch):
    calls = {"euler": [], "few_step": []}
    for name in calls:
        orig = SAMPLERS[name]

        def spy(den, x, sigmas, cond, _orig=orig, _name=name, **kw):
            calls[_name].append(sigmas.tolist())
            return _orig(den, x, sigmas, cond, **kw)

        monkeypatch.setitem(SAMPLERS, name, spy)
    return calls


def test_cli_few_step_sampling_of_a_multi_step_model_needs_force(recipe_run, tmp_path, capsys, spy_samplers):
    _, out, results = recipe_run
    stage1 = str(out / "rc" / "stage1")
    dest = tmp_path / "s1"
    assert main(["sample", "--ckpt", stage1, "--sampler", "few_step", "--out", str(dest)]) == 2
    err = capsys.readouterr().err
    assert "multi-step" in err and "--force" in err and err.count("\n") == 1
    assert not dest.with_suffix(".gif").exists() and spy_samplers["few_step"] == []
    assert main(["sample", "--ckpt", stage1, "--sampler", "few_step", "--force", "--denoising-steps", "1000",
                 "500", "--out", str(dest)]) == 0
    assert dest.with_suffix(".gif").is_file() and dest.with_suffix(".mp4").is_file()
    assert len(spy_samplers["few_step"]) == 4 and spy_samplers["euler"] == []  # 4 frames, block size 1
    assert all(s == pytest.approx([1.0, 5 / 6]) for s in spy_samplers["few_step"])


def test_cli_samples_a_dmd_checkpoint_few_step_by_default(recipe_run, tmp_path, capsys, spy_samplers):
    _, out, _ = recipe_run
    dmd = str(out / "rc" / "dmd")
    dest = tmp_path / "d"
    assert main(["sample", "--ckpt", dmd, "--out", str(dest), "--save-tensor"]) == 0
    assert dest.with_suffix(".gif").is_file()
    assert spy_samplers["euler"] == []
    first, *rest = spy_samplers["few_step"]
    assert first == pytest.approx([1.0, 0.9375, 5 / 6, 0.625])  # the first block's own 4-step schedule
    assert len(rest) == 3 and all(s == pytest.approx([1.0, 5 / 6]) for s in rest)
    video = torch.load(dest.with_suffix(".pt"))
    assert video.shape == (1, 4, 3, 16, 16) and torch.isfinite(video).all()
    assert main(["sample", "--ckpt", dmd, "--sampler", "euler", "--out", str(tmp_path / "e")]) == 2
    assert "few-step generator" in capsys.readouterr().err


def test_cd_motion_weight_weighs_the_frames_that_moved_and_leaves_a_still_video_alone():
    """CD weighs its loss as Stage 1 did (objective.motion_weight, diffusion.motion_weights): a still video's loss
    is unchanged, and a video whose second frame moved everywhere gets a loss affine in the weight."""
    def loss(video, weight):
        student, teacher = _SigmaStub(), _SigmaStub()
        with torch.no_grad():
            teacher.w.fill_(0.3)  # unlike the student: the loss is not zero
        obj = CausalCD(student, teacher, steps=4, shift=SHIFT, block_size=1, guidance=1.0, target_decay=0.5,
                       motion=(weight, 0.1))
        b = _batch(B=2, F=2)
        b.video[:] = video
        return obj.losses(b, 0, torch.Generator().manual_seed(3))["model"][0].item()

    still = torch.randn(2, 1, 3, 8, 8).expand(2, 2, 3, 8, 8).clone()
    assert loss(still, 0.0) == loss(still, 5.0) > 0
    moving = still.clone()
    moving[:, 1] += 1.0  # every element of frame 1 moved by more than the threshold
    l0, l1, l2 = loss(moving, 0.0), loss(moving, 1.0), loss(moving, 2.0)
    assert l1 > l0 and abs((l2 - l0) - 2 * (l1 - l0)) < 1e-6 * l2
