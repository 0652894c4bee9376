"""Spec §9.2 Toys A and C on the real student: causal ODE and causal CD learn the AR teacher's flow map, the
bidirectional-teacher ODE baseline learns a blurred conditional expectation.

Toy A (2 frames of 1-d vectors, s = +-1, std 0.05; videos [B, 2, 1, 1, 1]); the student is the project's
tiny transformer with one token per frame. One module fixture trains, once:

    stage 1   flow matching, teacher forcing (block 1), from scratch                      -> the shared init
    ode       ODERegression on 48-step Euler pairs of the analytic ARTeacher (GT context)  from stage 1
    cd        CausalCD against the analytic ARTeacher (one Euler step, grid 48)            from stage 1
    bi        ODERegression on pairs of the BidirectionalTeacher (SF baseline: noisy
              same-trajectory context, block-causal plan, per-frame anchors)             from stage 1

and scores each at 1, 2 and 4 steps (framecast/eval/vectors.py): the RMS error of its x0 against the AR
teacher's exact (RK4) flow map at the sigmas the schedule visits, with ground-truth context; and the samples
of the streamed few-step sampler (frame 2 generated from the student's own frame 1): mass of frame 1 in
|x| < 0.5, sign agreement of the two frames, W1 of frame 1 to the data. `pytest -s` prints the table.

Budget choices (measured on 2 shared CPU cores, one thread; the file runs in ~25 s on a quiet machine,
~30-40 s next to another job): batch 256, 400/200/300/300 steps (stage 1/ode/cd/bi), lr 1e-3 annealed
linearly to 0. Batch 512 gave the same numbers within seed noise at twice the cost. Two departures from
the reference settings, both measured:
* CD target decay 0 (the target is the student's stop-grad copy after each update, as in improved
  consistency training) instead of 0.99. Information travels about one grid level per 1/(1 - decay)
  steps and 40 of the 48 shift-5 levels lie above sigma 0.5. After 300 steps the sigma = 1 RMS error
  (frame 1) was 0.945 with decay 0.99 (the init's 0.94: the front had only reached sigma ~0.5), 0.65
  with 0.9 and 0.15 with 0; even 3000 steps at 0.99 left it at 0.70 (sigma .9375: 0.33, .8333: 0.18).
  Longer CD at decay 0 helps little (600 steps: 0.13): the never-trained last level (sigma 0.096,
  method.md §12.5) drifts, its error growing from 0.02 (init) to ~0.045, and the map shrinks slightly
  (mean |x1| 0.97).
* The baseline regresses onto very noisy targets (the future noise decides the sign), so in 300 steps it is
  still on its way to E[x0^1 | eps^1] (near-zero mass 0.29; 2000 steps: 0.45; the optimum ~0.48).

Thresholds: the measured value (seed 0, as run here) and the range over 3 further seeds (all seeds of the
fixture shifted) are in the comments; each bound keeps ~2x margin to that range where the separation from
the other side allows.
"""

from __future__ import annotations

import copy
import math
import time

import pytest
import torch

from framecast import config as C
from framecast import flow
from framecast.data.batch import Batch
from framecast.data.vectors import (
    ARTeacher,
    BidirectionalTeacher,
    VectorMixture,
    VectorSource,
    flow_map,
)
from framecast.eval import vectors as ev
from framecast.generate import build_denoiser
from framecast.models.attention import AttentionPlan
from framecast.models.conditioning import Cond
from framecast.objectives.consistency import CausalCD
from framecast.objectives.diffusion import FlowMatching
from framecast.objectives.ode import ODERegression, generate_pairs
from framecast.rollout import generate
from framecast.sampling import few_step

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: threads only add sync cost

f64 = torch.float64
SHIFT = 5.0
TEXT_DIM = 32  # the tiny preset's text_dim
ANCHORS = flow.few_step_sigmas([1000, 750, 500, 250], SHIFT)  # [1, .9375, .8333, .625]
SCHEDULES = {1: [1000], 2: [1000, 500], 4: [1000, 750, 500, 250]}
BATCH = 256
N_EVAL = 2048




@pytest.fixture(scope="module")
def toy() -> VectorMixture:
    return VectorMixture.toy_a(num_frames=2, dim=1)


def _cond(n: int) -> Cond:
    return Cond(torch.zeros(n, 1, TEXT_DIM))


# ------------------------------------------------------------------------------------------------
# The metrics themselves
# ------------------------------------------------------------------------------------------------


def test_wasserstein1_exact_values():
    a = torch.tensor([0.0, 1.0, 3.0])
    assert ev.wasserstein1(a, a) == 0.0
    assert ev.wasserstein1(a, a + 0.25) == pytest.approx(0.25)  # a shift moves every quantile
    assert ev.wasserstein1(torch.zeros(5), torch.ones(7)) == pytest.approx(1.0)
    # equal sizes: mean |sorted a - sorted b|; unequal sizes: the same distribution repeated is at distance 0
    b = torch.tensor([2.0, -1.0, 0.5])
    assert ev.wasserstein1(a, b) == pytest.approx(float((a.sort().values - b.sort().values).abs().mean()))
    assert ev.wasserstein1(a, a.repeat(4)) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="non-empty"):
        ev.wasserstein1(a, a[:0])


def test_wasserstein1_matches_scipy_for_unequal_sizes():
    stats = pytest.importorskip("scipy.stats")
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(300, generator=g), 0.5 + 2 * torch.randn(170, generator=g)
    assert ev.wasserstein1(a, b) == pytest.approx(stats.wasserstein_distance(a.numpy(), b.numpy()), rel=1e-9)


def test_sample_metrics_on_data_are_near_perfect(toy):
    g = torch.Generator().manual_seed(0)
    x, ref = toy.sample(4000, g)[0], toy.sample(20000, g)[0]
    m = ev.sample_metrics(x, ref)
    assert m["near_zero"] == 0.0 and m["sign"] == 1.0
    assert m["w1"] < 0.03 and m["w1_last"] < 0.03  # sampling error only (~0.01)


def test_sample_metrics_flag_collapsed_blurred_and_independent_samples(toy):
    g = torch.Generator().manual_seed(1)
    ref = toy.sample(20000, g)[0]
    zeros = torch.zeros(4000, 2, 1, 1, 1)
    assert ev.near_zero_mass(zeros) == 1.0 and ev.frame_w1(zeros, ref) == pytest.approx(1.0, abs=0.01)
    # the SF-style optimum E[x0^1 | eps^1] = mu (2 Phi(eps^1) - 1) (method.md §9.2): about half its mass near 0
    eps = torch.randn(4000, 2, 1, 1, 1, generator=g)
    blurred = torch.erf(eps / math.sqrt(2))
    assert 0.45 < ev.near_zero_mass(blurred) < 0.55 and ev.frame_w1(blurred, ref) > 0.4
    # right marginals, independent signs: W1 is perfect, only the sign agreement sees it
    indep = torch.cat([toy.sample(4000, g)[0][:, :1], toy.sample(4000, g)[0][:, 1:]], 1)
    assert abs(ev.sign_agreement(indep) - 0.5) < 0.05 and ev.frame_w1(indep, ref) < 0.03
    with pytest.raises(ValueError, match=r"\[B, F, D, 1, 1\]"):
        ev.near_zero_mass(torch.zeros(4, 2, 1, 2, 2))
    with pytest.raises(ValueError, match="differ"):
        ev.rms(zeros, zeros[:, :1])


def test_flow_map_errors_of_the_teachers_own_denoiser(toy):
    """The AR teacher's one-step x0 = E[x0 | x_s, context] is the Stage-1 optimum: at sigma 1 it predicts
    E[x0^1] = 0 for frame 1 (error ~ mu = 1), while frame 2's context fixes the mode (small error)."""
    g = torch.Generator().manual_seed(2)
    x_gt = toy.sample(1024, g)[0]
    eps = torch.randn(x_gt.shape, generator=g)
    teacher = ARTeacher(toy)
    err = ev.flow_map_errors(teacher, teacher, x_gt, eps, [1.0, 0.05], _cond(1024), steps=50)  # [2, F]
    assert err.shape == (2, 2)
    assert 0.95 < err[0, 0] < 1.05 and err[0, 1] < 0.1  # frame 1 blurred to 0, frame 2 knows its sign
    assert err[1].max() < 0.02  # near sigma 0 the posterior mean and the flow map agree


# ------------------------------------------------------------------------------------------------
# Training the students (module fixture: once)
# ------------------------------------------------------------------------------------------------


def _train(model, objective, batches, *, steps: int, lr: float, betas: tuple[float, float], seed: int,
           after_update=None) -> list[float]:
    """AdamW (wd 0.01, clip 10), lr annealed linearly to 0; `batches(generator) -> Batch`."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, betas=betas,
                            weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1 - i / steps)
    model.train()
    losses = []
    for step in range(steps):
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        loss = objective.losses(batches(g), step, g)["model"][0]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if after_update is not None:
            after_update("model")
        sched.step()
        losses.append(loss.item())
    model.eval()
    return losses


def _pair_batches(pairs, batch_size: int):
    """Random minibatches of stored ODE pairs, shaped like data/trajectories.PairSource's batches."""
    n = pairs.states.shape[0]

    def batches(g: torch.Generator) -> Batch:
        i = torch.randint(0, n, (batch_size,), generator=g)
        text = torch.zeros(batch_size, 1, TEXT_DIM)
        return Batch(pairs.clean[i], Cond(text), Cond(text.clone()), [""] * batch_size,
                     {"states": pairs.states[i], "endpoint": pairs.endpoint[i]})

    return batches


def _evaluate(model, toy: VectorMixture, data: dict) -> dict:
    """{k: {flow, near_zero, sign, w1, w1_last, cond_exp}} for the k-step schedules."""
    errs = ev.flow_map_errors(model, ARTeacher(toy), data["x_gt"], data["eps"], ANCHORS, _cond(N_EVAL),
                              steps=100)  # [A, F]
    out = {}
    for k, steps in SCHEDULES.items():
        sig = flow.few_step_sigmas(steps, SHIFT)
        rows = [ANCHORS.tolist().index(s) for s in sig.tolist()]
        with torch.no_grad():
            x = generate(model, data["noise"], _cond(N_EVAL), sampler=few_step, sigmas=sig.float(), block_size=1,
                         generator=torch.Generator().manual_seed(11))
        m = ev.sample_metrics(x, data["ref"])
        m["flow"] = float(errs[rows].max())  # worst frame, worst sigma the schedule visits
        # distance of frame 1 to the bidirectional baseline's optimum mu (2 Phi(eps^1) - 1) (1-step only)
        m["cond_exp"] = float(ev.rms(x[:, :1], data["cond_exp"]).max())
        out[k] = m
    out["per_anchor"] = errs
    return out


@pytest.fixture(scope="module")
def students(toy):
    t0 = time.perf_counter()
    source = VectorSource(toy, text_dim=TEXT_DIM)
    mc = C.model_preset("tiny", in_channels=1, out_channels=1, patch_size=(1, 1, 1))
    times = {}

    torch.manual_seed(0)
    stage1 = build_denoiser(mc)
    fm = FlowMatching(stage1, C.FlowConfig(shift=SHIFT),
                      C.ObjectiveConfig(mode="teacher_forcing", block_size=1, text_dropout=0.0))
    _train(stage1, fm, lambda g: source.batch(BATCH, g), steps=400, lr=1e-3, betas=(0.9, 0.999), seed=1)
    times["stage1"] = time.perf_counter() - t0

    # ODE pairs from fresh data (8192 videos; 48 Euler steps of the exact teachers take ~1 s)
    g = torch.Generator().manual_seed(5)
    x_pairs = toy.sample(8192, g)[0]
    noise_pairs = torch.randn(x_pairs.shape, generator=g)
    kw = dict(block_size=1, steps=48, shift=SHIFT, anchors=ANCHORS)
    causal_pairs = generate_pairs(ARTeacher(toy), x_pairs, _cond(8192), noise_pairs, mode="packed", **kw)
    bi_pairs = generate_pairs(BidirectionalTeacher(toy), x_pairs, _cond(8192), noise_pairs,
                              teacher_kind="bidirectional", **kw)
    exact = flow_map(ARTeacher(toy), noise_pairs[:2048].to(f64), 1.0, steps=100,
                     plan=AttentionPlan("teacher_forcing", 1), clean=x_pairs[:2048].to(f64))
    euler_err = ev.rms(causal_pairs.endpoint[:2048], exact)  # [F] the pairs' own discretisation error

    models = {}
    t = time.perf_counter()
    models["ode"] = copy.deepcopy(stage1)
    obj = ODERegression(models["ode"], anchors=ANCHORS, block_size=1, teacher_kind="causal")
    _train(models["ode"], obj, _pair_batches(causal_pairs, BATCH), steps=200, lr=1e-3, betas=(0.9, 0.999),
           seed=2)
    times["ode"] = time.perf_counter() - t

    t = time.perf_counter()
    models["cd"] = copy.deepcopy(stage1)
    obj = CausalCD(models["cd"], ARTeacher(toy), steps=48, shift=SHIFT, block_size=1, guidance=1.0,
                   target_decay=0.0, few_step_sigmas=ANCHORS)
    _train(models["cd"], obj, lambda g: source.batch(BATCH, g), steps=300, lr=1e-3, betas=(0.0, 0.999), seed=3,
           after_update=obj.after_update)
    times["cd"] = time.perf_counter() - t

    t = time.perf_counter()
    models["bi"] = copy.deepcopy(stage1)
    obj = ODERegression(models["bi"], anchors=ANCHORS, block_size=1, teacher_kind="bidirectional")
    _train(models["bi"], obj, _pair_batches(bi_pairs, BATCH), steps=300, lr=1e-3, betas=(0.9, 0.999), seed=4)
    times["bi"] = time.perf_counter() - t

    t = time.perf_counter()
    g = torch.Generator().manual_seed(123)
    x_gt = toy.sample(N_EVAL, g)[0]
    data = {"x_gt": x_gt, "eps": torch.randn(x_gt.shape, generator=g), "noise": torch.randn(x_gt.shape, generator=g),
            "ref": toy.sample(20000, g)[0]}
    data["cond_exp"] = torch.erf(data["noise"][:, :1] / math.sqrt(2))  # mu (2 Phi(eps^1) - 1), mu = 1
    results = {name: _evaluate(m, toy, data) for name, m in {"stage1": stage1, **models}.items()}
    times["eval"] = time.perf_counter() - t

    print(f"\nToy A students (N={N_EVAL}); Euler-48 pairs vs exact flow map, RMS per frame: "
          f"{[round(v, 4) for v in euler_err.tolist()]}")
    print(f"{'student':8s} {'k':>2s} {'flow':>7s} {'near0':>7s} {'sign':>7s} {'w1':>7s} {'w1_last':>7s} "
          f"{'to E[x0|eps]':>12s}")
    for name, per_k in results.items():
        for k in SCHEDULES:
            m = per_k[k]
            print(f"{name:8s} {k:2d} {m['flow']:7.4f} {m['near_zero']:7.4f} {m['sign']:7.4f} {m['w1']:7.4f} "
                  f"{m['w1_last']:7.4f} {m['cond_exp']:12.4f}")
    print("flow-map RMS per anchor sigma", [round(v, 4) for v in ANCHORS.tolist()], "(frame 1 / frame 2):")
    for name, per_k in results.items():
        e = per_k["per_anchor"]
        print(f"{name:8s}", "  ".join(f"{a:.3f}/{b:.3f}" for a, b in e.tolist()))
    print("seconds:", {k: round(v, 1) for k, v in times.items()}, f"total {time.perf_counter() - t0:.1f}")
    return results


# ------------------------------------------------------------------------------------------------
# Acceptance: causal ODE and causal CD match the AR flow map; the bidirectional baseline blurs
# ------------------------------------------------------------------------------------------------


def test_stage1_init_is_not_yet_a_few_step_generator(students):
    """Reference point: the shared init's 1-step output is E[x0^1] ~ 0, so everything below is learned."""
    m = students["stage1"][1]
    assert m["near_zero"] > 0.9, m  # 0.982
    assert m["flow"] > 0.8, m  # 0.935


# Causal students, per metric: bound, with the measured values (seed 0: k = 1 / 2 / 4; other seeds: range over k).
# flow = RMS of x0 vs the exact AR flow map, worst frame and worst sigma the schedule visits (sigma = 1 dominates).
CAUSAL_MAX = {
    "ode": {"flow": 0.16,  # 0.077 / 0.077 / 0.077; seeds 0.067-0.081
            "near_zero": 0.03,  # 0.007 / 0.007 / 0.002; seeds <= 0.008
            "w1": 0.15},  # frame 1 0.052 / 0.074 / 0.062, last frame 0.040 / 0.071 / 0.054; seeds <= 0.072
    "cd": {"flow": 0.30,  # 0.156 / 0.156 / 0.156; seeds 0.145-0.169 (baseline: 0.44)
           "near_zero": 0.08,  # 0.026 / 0.024 / 0.014; seeds <= 0.036
           "w1": 0.25},  # frame 1 0.078 / 0.085 / 0.103, last frame 0.104 / 0.122 / 0.130; seeds <= 0.135
}
SIGN_MIN = 0.985  # ode 0.9985 / 0.9995 / 1.0, cd 0.998 / 0.999 / 0.9995; seeds >= 0.995 (baseline: 0.86)


@pytest.mark.parametrize("name", ["ode", "cd"])
@pytest.mark.parametrize("k", [1, 2, 4])
def test_causal_students_match_the_ar_flow_map(students, name, k):
    m, bound = students[name][k], CAUSAL_MAX[name]
    assert m["flow"] < bound["flow"], m
    assert m["near_zero"] < bound["near_zero"], m  # bimodal at +-1: no conditional-expectation mass
    assert m["sign"] > SIGN_MIN, m  # frame 2 follows the sign of the student's own frame 1
    assert m["w1"] < bound["w1"] and m["w1_last"] < bound["w1"], m


def test_bidirectional_baseline_learns_the_conditional_expectation(students):
    """Spec §9.2 (a) at 1 step: the SF-style student's frame 1 is mu (2 Phi(eps^1) - 1), not the flow map."""
    m = students["bi"][1]
    assert m["near_zero"] > 0.15, m  # 0.292; seeds 0.258-0.309 (causal students < 0.04; the optimum 0.48)
    assert m["sign"] < 0.95, m  # 0.857; seeds 0.871-0.904 (causal students > 0.995)
    assert m["w1"] > 0.25, m  # 0.397; seeds 0.357-0.377 (causal students < 0.11)
    assert m["flow"] > 0.3, m  # 0.439; seeds 0.416-0.438: far from the AR flow map ...
    assert m["cond_exp"] < 0.3, m  # 0.143; seeds 0.149-0.177: ... and near E[x0^1 | eps^1] (causal: > 0.48)
