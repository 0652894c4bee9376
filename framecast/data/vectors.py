"""Vector videos and analytic teachers: the theory testbed of method.md §9.2 (Toy A, reused by Toys C/D).

Each frame is a D-vector stored as a video [B, F, D, 1, 1] (C = D, H = W = 1), drawn from a Gaussian mixture
whose frames are independent given the component k: x^f = means[k, f] + std * xi. E[x0 | x_s] is then closed
form, so the teachers below are *exact* velocity fields with the `Denoiser` interface (velocity / x0 /
new_cache / commit) and plug into `sampling` and `rollout` unchanged.

* `BidirectionalTeacher` (joint posterior): the flow of frame i depends on the noise of later frames (in Toy A
  sign(eps1 + eps2) picks the mode), so an AR student that sees only eps^i can at best learn E[flow | eps^i],
  a blurred conditional expectation (method.md §9.2 (a)).
* `ARTeacher` (p(block | clean earlier frames)): frame i's flow is a function of (x_s^i, clean context) alone,
  which an AR student can represent exactly (method.md §9.2 (b)).

Maths (method.md §9.2), per frame f at noise level s_f, with a = 1 - s_f and var = a^2 std^2 + s_f^2:
    x_s^f | k ~ N(a m_k^f, var I),   E[x0^f | x_s^f, k] = m_k^f + a std^2 / var * (x_s^f - a m_k^f),
and the responsibilities r_k multiply the likelihoods of every frame the teacher conditions on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .. import rng
from ..models.attention import AttentionPlan
from ..models.conditioning import Cond
from ..models.kv_cache import CommittedFrames
from .batch import Batch

Tensor = torch.Tensor
f64 = torch.float64


def _flat(x: Tensor, dim: int) -> Tensor:
    """[B, F, D, 1, 1] video -> [B, F, D] float64 vectors; anything else is a caller error."""
    if x.ndim != 5 or tuple(x.shape[2:]) != (dim, 1, 1):
        raise ValueError(f"vector videos are [B, F, {dim}, 1, 1]; got {tuple(x.shape)}")
    return x.reshape(x.shape[:3]).to(f64)


def _frame_sigma(sigma: Tensor | float, x: Tensor) -> Tensor:
    """sigma [B, F], [B] or scalar -> [B, F] float64 (the broadcasting of flow._per_frame)."""
    s = torch.as_tensor(sigma, dtype=f64, device=x.device)
    if s.ndim > 2:
        raise ValueError(f"sigma must be [B, F], [B] or a scalar; got {tuple(s.shape)}")
    return torch.broadcast_to(s.reshape(*s.shape, *[1] * (2 - s.ndim)), x.shape[:2])


@dataclass
class VectorMixture:
    means: Tensor  # [M, F, D] component means per frame
    weights: Tensor  # [M] mixture weights, summing to 1
    std: float  # isotropic per-coordinate std of every frame given the component

    def __post_init__(self) -> None:
        self.means = torch.as_tensor(self.means, dtype=f64)
        self.weights = torch.as_tensor(self.weights, dtype=f64)
        if self.means.ndim != 3 or self.weights.shape != self.means.shape[:1]:
            raise ValueError(f"means must be [M, F, D] and weights [M]; got {tuple(self.means.shape)}, "
                             f"{tuple(self.weights.shape)}")
        if bool((self.weights < 0).any()) or abs(float(self.weights.sum()) - 1) > 1e-6:
            raise ValueError(f"weights must be a probability vector, got {self.weights.tolist()}")
        if not self.std > 0:  # the clean-context likelihood divides by std^2
            raise ValueError(f"std must be > 0, got {self.std}")

    @property
    def num_frames(self) -> int:
        return self.means.shape[1]

    @property
    def dim(self) -> int:
        return self.means.shape[2]

    @classmethod
    def toy_a(cls, num_frames: int = 2, dim: int = 1, mu: float = 1.0, std: float = 0.05) -> "VectorMixture":
        """Spec §9.2 Toy A: s = +-1 with probability 1/2, every coordinate of every frame at s * mu."""
        means = torch.stack([torch.full((num_frames, dim), mu), torch.full((num_frames, dim), -mu)])  # [2, F, D]
        return cls(means, torch.tensor([0.5, 0.5]), std)

    @classmethod
    def random(cls, num_frames: int, dim: int, num_components: int, std: float, seed: int) -> "VectorMixture":
        """Means with seeded +-1 entries, equal weights."""
        g = torch.Generator().manual_seed(seed)
        means = torch.randint(0, 2, (num_components, num_frames, dim), generator=g) * 2.0 - 1  # [M, F, D]
        return cls(means, torch.full((num_components,), 1.0 / num_components), std)

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """(x [n, F, D, 1, 1] float32, k [n] long)."""
        k = rng.multinomial(self.weights, n, generator)  # [n]
        xi = rng.randn((n, self.num_frames, self.dim), generator, dtype=f64)  # [n, F, D]
        return (self.means[k] + self.std * xi).float()[..., None, None], k

    def log_prob(self, x0: Tensor) -> Tensor:
        """Exact log density [n] of clean videos x0 [n, F, D, 1, 1]."""
        x = _flat(x0, self.dim)  # [n, F, D]
        if x.shape[1] != self.num_frames:
            raise ValueError(f"log_prob needs all {self.num_frames} frames, got {x.shape[1]}")
        d2 = ((x[:, None] - self.means[None]) ** 2).sum((2, 3))  # [n, M]
        norm = -0.5 * self.num_frames * self.dim * math.log(2 * math.pi * self.std ** 2)
        return torch.logsumexp(self.weights.log() - d2 / (2 * self.std ** 2), dim=1) + norm


class VectorSource:
    """Training batches of vector videos for the trainer; unconditional (all-zero text states)."""

    def __init__(self, mixture: VectorMixture, text_dim: int, text_tokens: int = 1) -> None:
        self.mixture, self.text_dim, self.text_tokens = mixture, text_dim, text_tokens

    def batch(self, batch_size: int, generator: torch.Generator) -> Batch:
        video, _ = self.mixture.sample(batch_size, generator)  # [B, F, D, 1, 1]
        text = torch.zeros(batch_size, self.text_tokens, self.text_dim)  # [B, Lt, Dt]
        return Batch(video, Cond(text), Cond(text.clone()), [""] * batch_size)


class ContextCache(CommittedFrames):
    """Stand-in for KVCache: the analytic teachers need the committed clean frames, not K/V."""

    def __init__(self, *, block_size: int = 1, window: int = 0, sink: int = 0) -> None:
        self.block_size, self.window, self.sink = block_size, window, sink  # stored; no eviction
        self.reset()

    def reset(self) -> None:
        self.frames = torch.empty(0, dtype=torch.long)  # [Fc] absolute positions
        self.values: Tensor | None = None  # [B, Fc, D, 1, 1]


def _log_lik(x: Tensor, a: Tensor, var: Tensor, means: Tensor) -> Tensor:
    """sum_f log N(x^f; a_f m_k^f, var_f I) - const(k) -> [B, M]; x [B, F, D], a/var [B, F], means [M, F, D]."""
    diff = x[:, None] - a[:, None, :, None] * means[None]  # [B, M, F, D]
    return -((diff ** 2).sum(-1) / (2 * var[:, None])).sum(-1)  # [B, M]


def _velocity(x: Tensor, s: Tensor, means: Tensor, std: float, log_prior: Tensor) -> Tensor:
    """Exact v [B, F, D] of the frames x [B, F, D] at s [B, F]; log_prior [B or 1, M] holds any context."""
    a = 1 - s
    var = a ** 2 * std ** 2 + s ** 2  # [B, F]
    r = torch.softmax(log_prior + _log_lik(x, a, var, means), dim=-1)  # [B, M] (log-sum-exp inside)
    m_bar = torch.einsum("bm,mfd->bfd", r, means)  # [B, F, D]
    # (x - E[x0|x,k]) / s simplifies to ((s - a std^2) x - s m_k) / var: linear in m_k, so the mixture
    # needs only m_bar, and nothing divides by s. At s = 0 this is the exact limit E[eps - x0 | x0 = x] = -x
    # (finite, no NaN), and x0 = x - s v = x there.
    return ((s - a * std ** 2)[..., None] * x - s[..., None] * m_bar) / var[..., None]


class _AnalyticTeacher:
    """Denoiser-like plumbing shared by both teachers: input checks, velocity/x0, cache and commit."""

    def __init__(self, mixture: VectorMixture) -> None:
        self.mixture = mixture

    def new_cache(self, *, block_size: int = 1, window: int = 0, sink: int = 0) -> ContextCache:
        return ContextCache(block_size=block_size, window=window, sink=sink)

    def _inputs(self, x: Tensor, sigma: Tensor | float, positions: Tensor | None,
                start: int) -> tuple[Tensor, Tensor, Tensor]:
        """-> x [B, F, D], s [B, F] (float64) and validated absolute positions [F] (default start + arange)."""
        xf, s = _flat(x, self.mixture.dim), _frame_sigma(sigma, x)  # [B, F, D], [B, F]
        F = xf.shape[1]
        if bool(((s < 0) | (s > 1)).any()):
            raise ValueError("sigma must lie in [0, 1]")
        pos = torch.arange(start, start + F) if positions is None else torch.as_tensor(positions).long().cpu()
        if pos.shape != (F,):
            raise ValueError(f"positions must be [{F}] (one per frame of x), got {tuple(pos.shape)}")
        if bool(((pos < 0) | (pos >= self.mixture.num_frames)).any()):
            raise ValueError(f"frame positions {pos.tolist()} fall outside the mixture's "
                             f"{self.mixture.num_frames} frames")
        return xf, s, pos

    def _block(self, xf: Tensor, s: Tensor, pos: Tensor, context: Tensor | None, ctx_pos: Tensor) -> Tensor:
        """v [B, Fb, D] of one jointly denoised block given clean context [B, Fc, D] at ctx_pos [Fc]."""
        m, dev = self.mixture, xf.device
        log_prior = m.weights.log().to(dev)[None]  # [1, M]
        if context is not None and ctx_pos.numel():  # clean frames: a = 1, var = std^2
            ones = torch.ones(context.shape[:2], dtype=f64, device=dev)  # [B, Fc]
            log_prior = log_prior + _log_lik(context, ones, ones * m.std ** 2, m.means[:, ctx_pos].to(dev))
        return _velocity(xf, s, m.means[:, pos].to(dev), m.std, log_prior)

    def velocity(self, x: Tensor, sigma: Tensor, cond: Cond | None = None, *, guidance=None,
                 plan: AttentionPlan | None = None, cache: ContextCache | None = None,
                 positions: Tensor | None = None, clean: Tensor | None = None) -> Tensor:
        """v [B, F, D, 1, 1] for x at sigma [B, F]. `cond` is ignored: the data are unconditional."""
        if guidance is not None and guidance.scale != 1:
            raise ValueError("analytic teachers are unconditional")
        xf, s, pos = self._inputs(x, sigma, positions, cache.end if cache is not None else 0)
        return self._v(xf, s, pos, plan=plan, cache=cache, clean=clean).to(x.dtype).reshape(x.shape)

    def x0(self, x: Tensor, sigma: Tensor, cond: Cond | None = None, **kw) -> Tensor:
        """x0 = x - sigma v (exactly E[x0 | x] here)."""
        v = self.velocity(x, sigma, cond, **kw)
        return x - _frame_sigma(sigma, x).to(x.dtype)[..., None, None, None] * v

    @torch.no_grad()
    def commit(self, x0: Tensor, cond: Cond | None, cache: ContextCache, *, positions: Tensor | None = None,
               sigma: float = 0.0, guidance=None) -> None:
        """Append clean frames x0 [B, Fb, D, 1, 1] at `positions` (default cache.end + arange)."""
        if guidance is not None and guidance.scale != 1:
            raise ValueError("analytic teachers are unconditional")
        if float(sigma) != 0.0:  # the AR conditional is exact only for clean context
            raise ValueError(f"analytic teachers condition on clean context; got context sigma {sigma}")
        _, _, pos = self._inputs(x0, 0.0, positions, cache.end)
        if cache.values is not None and cache.values.shape[0] != x0.shape[0]:
            raise ValueError(f"batch {x0.shape[0]} does not match the cache's {cache.values.shape[0]}")
        if bool(torch.isin(pos, cache.frames).any()):
            raise ValueError(f"frames {pos.tolist()} are already in the cache")
        cache.values = x0.detach() if cache.values is None else torch.cat([cache.values, x0.detach()], 1)
        cache.frames = torch.cat([cache.frames, pos])


class BidirectionalTeacher(_AnalyticTeacher):
    """Joint posterior over all frames of x (each at its own sigma); plan, cache and clean do not condition."""

    def _v(self, xf: Tensor, s: Tensor, pos: Tensor, **_) -> Tensor:
        return self._block(xf, s, pos, None, pos[:0])


class ARTeacher(_AnalyticTeacher):
    """p(block | clean frames): context from `clean=` (packed TF), `cache=` (streaming) or none (marginal)."""

    def _v(self, xf: Tensor, s: Tensor, pos: Tensor, *, plan: AttentionPlan | None, cache: ContextCache | None,
           clean: Tensor | None) -> Tensor:
        if clean is not None and cache is not None:
            raise ValueError("give the context either as clean= (packed) or as cache= (streaming), not both")
        if clean is None:  # streaming: x is one block, conditioned on whatever the cache holds (maybe nothing)
            if cache is None or cache.values is None:
                return self._block(xf, s, pos, None, pos[:0])
            context = _flat(cache.values, self.mixture.dim).to(xf.device)  # [B, Fc, D]
            if context.shape[0] != xf.shape[0]:
                raise ValueError(f"batch {xf.shape[0]} does not match the cache's {context.shape[0]}")
            if bool(torch.isin(pos, cache.frames).any()):
                raise ValueError(f"frames {pos.tolist()} are both in the block and in the context")
            return self._block(xf, s, pos, context, cache.frames)
        # packed teacher forcing: block b = frames with pos // K == b, seeing the clean frames of blocks < b
        if plan is None or plan.kind != "teacher_forcing":
            raise ValueError("clean= (packed mode) needs a teacher_forcing AttentionPlan")
        cf = _flat(clean, self.mixture.dim).to(xf.device)  # [B, F, D]
        if cf.shape != xf.shape:
            raise ValueError(f"clean {tuple(clean.shape)} must match x {tuple(xf.shape)}")
        blk = pos // plan.block_size  # [F], the block rule of AttentionPlan.allowed
        v = torch.empty_like(xf)  # [B, F, D]
        for b in blk.unique().tolist():
            own, ctx = blk == b, blk < b  # [F] masks: this block's noisy frames, earlier blocks' clean ones
            v[:, own] = self._block(xf[:, own], s[:, own], pos[own], cf[:, ctx], pos[ctx])
        return v


def flow_map(teacher, x: Tensor, sigma_from: float, *, steps: int = 200, cond: Cond | None = None,
             **kw) -> Tensor:
    """Exact flow map x_{sigma_from} -> x_0 (classical RK4, uniform sigma grid, float64); `kw` goes to
    `teacher.velocity` (e.g. clean= and plan= for the AR teacher's packed mode, or cache=)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    y = x.to(f64)  # [B, F, D, 1, 1]
    grid = torch.linspace(float(sigma_from), 0.0, steps + 1, dtype=f64).tolist()  # exact endpoints, none < 0

    def f(y: Tensor, s: float) -> Tensor:
        return teacher.velocity(y, torch.full(y.shape[:2], s, dtype=f64, device=y.device), cond, **kw)

    for s, s_next in zip(grid[:-1], grid[1:]):  # integrate dx/ds = v downwards: the step h is negative
        h, mid = s_next - s, 0.5 * (s + s_next)
        k1 = f(y, s)
        k2 = f(y + 0.5 * h * k1, mid)
        k3 = f(y + 0.5 * h * k2, mid)
        k4 = f(y + h * k3, s_next)
        y = y + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return y.to(x.dtype)
