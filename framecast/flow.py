"""Rectified-flow schedule as pure functions of sigma in [0, 1] (method.md §2).

Conventions (architecture.md §3): `x_s = (1 - s) x0 + s eps`, velocity target `v = eps - x0`, `x0 = x_s - s v`.
Noise levels are `sigma[B, F]` (one per frame) and broadcast over `[B, F, C, H, W]` videos. Wan's
integer-looking timestep `t = 1000 sigma` appears only at the time-embedding boundary (models/).

Nothing here keeps state: no `set_timesteps`, no step index, no nearest-grid snapping of a requested
sigma (method.md §12.7 explains why the reference's snapping is a source of mismatches).
"""

from __future__ import annotations

import functools
import math

import torch

from . import rng

Tensor = torch.Tensor


def shift(sigma: Tensor | float, s: float) -> Tensor | float:
    """Wan/SD3 time shift: s*sigma / (1 + (s-1)*sigma). Monotone, fixes 0 and 1 (method.md §2)."""
    return s * sigma / (1 + (s - 1) * sigma)


def _per_frame(sigma: Tensor, x: Tensor) -> Tensor:
    """sigma[B, F] (or [B] / scalar) -> broadcastable against x[B, F, ...]."""
    if sigma.ndim > x.ndim:
        raise ValueError(f"sigma has shape {tuple(sigma.shape)}, more dims than the video {tuple(x.shape)}")
    return sigma.reshape(*sigma.shape, *([1] * (x.ndim - sigma.ndim))).to(x.dtype)


def add_noise(x0: Tensor, eps: Tensor, sigma: Tensor) -> Tensor:
    """x_s = (1 - s) x0 + s eps, per frame."""
    s = _per_frame(sigma, x0)
    return (1 - s) * x0 + s * eps


def velocity_target(x0: Tensor, eps: Tensor) -> Tensor:
    """Flow-matching target v* = eps - x0 (method.md §2)."""
    return eps - x0


def v_to_x0(xt: Tensor, v: Tensor, sigma: Tensor) -> Tensor:
    """x0 = x_s - s v."""
    return xt - _per_frame(sigma, xt) * v


def x0_to_v(xt: Tensor, x0: Tensor, sigma: Tensor) -> Tensor:
    """v = (x_s - x0) / s; undefined at s = 0, where callers must not ask for it."""
    s = _per_frame(sigma, xt)
    if bool((s == 0).any()):
        raise ValueError("x0_to_v is undefined at sigma = 0")
    return (xt - x0) / s


def euler_step(xt: Tensor, v: Tensor, sigma: Tensor, sigma_next: Tensor) -> Tensor:
    """One probability-flow ODE step: x_{s'} = x_s + (s' - s) v."""
    return xt + (_per_frame(sigma_next, xt) - _per_frame(sigma, xt)) * v


# ------------------------------------------------------------------------------------------------
# Grids and step lists
# ------------------------------------------------------------------------------------------------


def grid(num_steps: int, s: float, *, dtype: torch.dtype = torch.float64) -> Tensor:
    """N-step shifted grid with its endpoint: sigma_n = shift(1 - n/N), n = 0..N (so sigma_N = 0).

    With N = 48 and s = 5, indices 0/12/24/36 are exactly the 4-step sigmas 1, .9375, .8333, .625,
    which the causal-ODE anchors and the CD grid rely on (method.md §5.1, §12.3).
    """
    if num_steps < 1:
        raise ValueError(f"a grid needs at least one step, got {num_steps}")
    lin = 1 - torch.arange(num_steps + 1, dtype=dtype) / num_steps
    return shift(lin, s)


def few_step_sigmas(step_list: list[int] | tuple[int, ...], s: float, *, num_train_timesteps: int = 1000) -> Tensor:
    """The configs' warped step lists -> exact sigmas: [1000, 750, 500, 250] -> [1, .9375, .8333, .625].

    The reference appends t=0 to its 1000-point training grid and indexes it at 1000 - t (method.md §2), which
    is shift(t / 1000) exactly; we compute that directly instead of indexing a table.
    """
    t = torch.tensor([float(v) for v in step_list], dtype=torch.float64)
    if len(step_list) == 0 or bool((t <= 0).any()) or bool((t > num_train_timesteps).any()):
        raise ValueError(f"step list {list(step_list)} must be non-empty values in (0, {num_train_timesteps}]")
    if bool((t[1:] >= t[:-1]).any()):
        raise ValueError(f"step list {list(step_list)} must be strictly decreasing")
    return shift(t / num_train_timesteps, s)


def grid_indices(sigmas: Tensor, num_steps: int, s: float, *, atol: float = 1e-9) -> list[int]:
    """Indices of `sigmas` on `grid(num_steps, s)`; raises if a sigma is not a grid point.

    Causal ODE stores trajectory states at these indices, so any misalignment must fail loudly.
    """
    g = grid(num_steps, s)
    out = []
    for v in sigmas.tolist():
        i = int(torch.argmin((g - v).abs()))
        if abs(float(g[i]) - v) > atol:
            raise ValueError(f"sigma {v:.6f} is not on the {num_steps}-step shift-{s:g} grid "
                             f"(nearest {float(g[i]):.6f} at index {i})")
        out.append(i)
    return out


# ------------------------------------------------------------------------------------------------
# Training draws and weights
# ------------------------------------------------------------------------------------------------


def train_grid(s: float, num_train_timesteps: int = 1000) -> Tensor:
    """The 1000-point training grid: sigma_k = shift(1 - k/1000), k = 0..999 (sigma = 0 dropped, method.md §2)."""
    return grid(num_train_timesteps, s)[:-1]


def sample_block_sigmas(batch: int, num_frames: int, block_size: int, s: float, *,
                        num_train_timesteps: int = 1000, generator: torch.Generator | None = None,
                        shared: bool = False) -> Tensor:
    """Per-block training sigmas [B, F]: one grid index per block, shared by its K frames (method.md §4, §12.23).

    `shared=True` gives one sigma per video (bidirectional Stage 0, or CD/ODE's shared timestep).
    A trailing partial block (F not a multiple of K) gets its own draw.
    """
    num_blocks = 1 if shared else math.ceil(num_frames / block_size)
    k = rng.randint(0, num_train_timesteps, (batch, num_blocks), generator)
    sig = train_grid(s, num_train_timesteps).to(torch.float32)[k]  # [B, nb]
    if shared:
        return sig.expand(batch, num_frames).contiguous()
    return sig.repeat_interleave(block_size, dim=1)[:, :num_frames]


@functools.lru_cache(maxsize=8)
def _bell_constants(s: float, num_train_timesteps: int) -> tuple[float, float]:
    t = train_grid(s, num_train_timesteps) * num_train_timesteps
    y = torch.exp(-2 * ((t - num_train_timesteps / 2) / num_train_timesteps) ** 2)
    ymin = float(y.min())
    return ymin, float((y - ymin).sum())


def bell_weight(sigma: Tensor, s: float, num_train_timesteps: int = 1000) -> Tensor:
    """Stage-1 loss weight (method.md §2): y(t) = exp(-2((t-500)/1000)^2), normalised to mean 1 on the grid.

    w(1000) = 0 (pure noise carries no loss), peak ~2.08 at t = 500.
    """
    ymin, total = _bell_constants(float(s), num_train_timesteps)
    t = sigma.to(torch.float64) * num_train_timesteps
    y = torch.exp(-2 * ((t - num_train_timesteps / 2) / num_train_timesteps) ** 2)
    return ((y - ymin) * num_train_timesteps / total).clamp_min(0).to(sigma.dtype)
