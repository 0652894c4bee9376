"""Metrics for vector videos (data/vectors.py; method.md §9.2 Toys A and C).

A vector video is [B, F, D, 1, 1]: frame f of sample b is the D-vector x[b, f, :, 0, 0]. Because the data
are a known Gaussian mixture with exact analytic teachers, a few-step student can be scored two ways:

* against the teacher's **flow map** (`flow_map_errors`): the student's x0 prediction at a noisy input
  x_s = (1 - s) x_gt + s eps, with the ground-truth clean prefix as context, versus the exact flow map of
  the AR teacher from that s (what causal ODE and causal CD both distill, method.md §6, §9.1);
* by its **samples** (`sample_metrics`): the mass of frame f near 0 (the "conditional-expectation mass" of
  a mode-averaged student, method.md §9.2 (a)), the sign agreement of frames a and b (Toy A's frames share the
  sign of their component) and the 1-D Wasserstein-1 distance of a frame's coordinates to the data.

Everything but `flow_map_errors` is a pure function of tensors; results are Python floats (or [F] / [A, F]
tensors for per-frame values) so tests and benchmark tables can print and compare them directly.
"""

from __future__ import annotations

import torch

from .. import flow
from ..models.attention import AttentionPlan
from ..models.conditioning import Cond

Tensor = torch.Tensor
f64 = torch.float64


def vectors(x: Tensor) -> Tensor:
    """[B, F, D, 1, 1] vector video -> [B, F, D] float64; anything else is a caller error."""
    if x.ndim != 5 or tuple(x.shape[3:]) != (1, 1):
        raise ValueError(f"vector videos are [B, F, D, 1, 1]; got {tuple(x.shape)}")
    return x[..., 0, 0].to(f64)


def near_zero_mass(x: Tensor, frame: int = 0, radius: float = 0.5) -> float:
    """Fraction of samples whose frame `frame` lies within `radius` of 0 (Euclidean norm over D).

    x: [B, F, D, 1, 1]. In Toy A the modes sit at +-mu (mu = 1, std 0.05), so data put ~0 mass in |x| < 0.5,
    while the optimum of a student regressed on bidirectional pairs, E[x0^1 | eps^1] = mu (2 Phi(eps^1) - 1),
    puts ~48 % there (method.md §9.2).
    """
    v = vectors(x)[:, frame]  # [B, D]
    return float((v.norm(dim=-1) < radius).double().mean())


def sign_agreement(x: Tensor, a: int = 0, b: int = 1) -> float:
    """Fraction of (sample, coordinate) pairs where frames a and b have the same sign.

    x: [B, F, D, 1, 1]. Toy A's frames share their component's sign: data give 1.0, independent frames 0.5.
    A zero counts as its own sign (it agrees only with another zero).
    """
    v = vectors(x)  # [B, F, D]
    return float((v[:, a].sign() == v[:, b].sign()).double().mean())


def wasserstein1(a: Tensor, b: Tensor) -> float:
    """Exact 1-D Wasserstein-1 distance between two empirical distributions, integral |F_a - F_b|.

    a: [n], b: [m] (any sizes; for n = m this is mean |sort(a) - sort(b)|).
    """
    a, b = a.reshape(-1).to(f64), b.reshape(-1).to(f64)
    if a.numel() == 0 or b.numel() == 0:
        raise ValueError("wasserstein1 needs two non-empty samples")
    sa, sb = a.sort().values, b.sort().values
    pts = torch.cat([sa, sb]).sort().values  # [n + m] breakpoints of both step CDFs
    left = pts[:-1]  # the CDFs are constant on [pts[i], pts[i+1])
    cdf_a = torch.searchsorted(sa, left, right=True).to(f64) / sa.numel()
    cdf_b = torch.searchsorted(sb, left, right=True).to(f64) / sb.numel()
    return float(((cdf_a - cdf_b).abs() * pts.diff()).sum())


def frame_w1(x: Tensor, ref: Tensor, frame: int = 0) -> float:
    """W1 of frame `frame` of x to the same frame of ref, averaged over the D coordinates (1-D marginals).

    x: [B, F, D, 1, 1] samples; ref: [N, F', D, 1, 1] data (e.g. `VectorMixture.sample`), F' > frame.
    """
    xs, rs = vectors(x)[:, frame], vectors(ref)[:, frame]  # [B, D], [N, D]
    if xs.shape[1] != rs.shape[1]:
        raise ValueError(f"x has {xs.shape[1]} coordinates per frame, ref {rs.shape[1]}")
    return sum(wasserstein1(xs[:, d], rs[:, d]) for d in range(xs.shape[1])) / xs.shape[1]


def sample_metrics(x: Tensor, ref: Tensor, *, frame: int = 0, radius: float = 0.5) -> dict[str, float]:
    """Spec §9.2's sample metrics of a two-or-more-frame sample x [B, F, D, 1, 1] against data ref.

    near_zero: `near_zero_mass` of `frame`; sign: `sign_agreement` of frames 0 and 1; w1: `frame_w1` of
    `frame`; w1_last: `frame_w1` of the last frame (the one generated from the student's own context).
    """
    return {"near_zero": near_zero_mass(x, frame, radius), "sign": sign_agreement(x, 0, 1),
            "w1": frame_w1(x, ref, frame), "w1_last": frame_w1(x, ref, x.shape[1] - 1)}


def rms(pred: Tensor, target: Tensor) -> Tensor:
    """Per-frame root-mean-square error [F] of two vector videos [B, F, D, 1, 1] (mean over B and D)."""
    if pred.shape != target.shape:
        raise ValueError(f"shapes differ: {tuple(pred.shape)} vs {tuple(target.shape)}")
    return (vectors(pred) - vectors(target)).pow(2).mean(dim=(0, 2)).sqrt()


@torch.no_grad()
def flow_map_errors(student, teacher, x_gt: Tensor, noise: Tensor, sigmas: Tensor | list[float], cond: Cond, *,
                    block_size: int = 1, steps: int = 200) -> Tensor:
    """RMS error [A, F] of the student's x0 against the teacher's exact flow map, per sigma and frame.

    For each s in `sigmas` (A of them), every frame is noised to x_s = (1 - s) x_gt + s noise and both
    networks see the clean ground truth as context through the teacher-forcing plan (packed mode):

        pred   = student.x0(x_s, s | clean = x_gt)
        target = flow_map(teacher, x_s, s | clean = x_gt)      (RK4, `steps` steps, float64)

    so frame f is scored on its own problem given x_gt^{<f} (method.md §6: the per-block flow map that causal ODE
    and causal CD both distill). x_gt, noise: [B, F, D, 1, 1]; student: a Denoiser (x0 interface with
    plan=/clean=); teacher: an analytic `ARTeacher`.
    """
    from ..data.vectors import flow_map  # local: data/ imports nothing from eval/

    if x_gt.shape != noise.shape:
        raise ValueError(f"x_gt {tuple(x_gt.shape)} and noise {tuple(noise.shape)} differ")
    plan = AttentionPlan("teacher_forcing", block_size)
    B, F = x_gt.shape[:2]
    out = []
    for s in torch.as_tensor(sigmas, dtype=f64).tolist():
        sig = torch.full((B, F), s)
        xs = flow.add_noise(x_gt, noise, sig)  # [B, F, D, 1, 1]
        pred = student.x0(xs, sig, cond, plan=plan, clean=x_gt)
        target = flow_map(teacher, xs.to(f64), s, steps=steps, plan=plan, clean=x_gt.to(f64))
        out.append(rms(pred, target))
    return torch.stack(out)  # [A, F]
