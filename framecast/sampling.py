"""Per-block samplers with one signature (architecture.md §2):

    sampler(denoiser, x, sigmas, cond, *, cache, positions, guidance, generator) -> x0

`x` is the block's starting noise at `sigmas[0]`. The cache (if any) holds the committed context and is
only read here; the rollout commits.

* `euler`: the probability-flow ODE of a multi-step model (Stage 0/1 teachers, ODE-pair generation).
  `sigmas` ends at 0, e.g. `flow.grid(N, shift)`.
* `few_step`: the consistency-style sampler of distilled generators (method.md §2): predict x0, re-noise it with
  fresh noise to the next sigma, repeat; the last prediction is the output. `sigmas` has no trailing 0.
"""

from __future__ import annotations

from typing import Callable, Protocol

import torch

from . import flow
from . import rng
from .models.conditioning import Cond
from .models.denoiser import Guidance
from .models.kv_cache import KVCache

Tensor = torch.Tensor


class Sampler(Protocol):
    def __call__(self, denoiser, x: Tensor, sigmas: Tensor, cond: Cond, *, cache: KVCache | None = None,
                 positions: Tensor | None = None, guidance: Guidance | None = None,
                 generator: torch.Generator | None = None) -> Tensor: ...


def _sig(value: float, x: Tensor) -> Tensor:
    return torch.full(x.shape[:2], float(value), device=x.device)


def euler(denoiser, x: Tensor, sigmas: Tensor, cond: Cond, *, cache: KVCache | None = None,
          positions: Tensor | None = None, guidance: Guidance | None = None,
          generator: torch.Generator | None = None, callback: Callable[[int, Tensor], None] | None = None) -> Tensor:
    """Euler steps x_{s'} = x_s + (s' - s) v along `sigmas` (method.md §2); returns the state at sigmas[-1]."""
    if float(sigmas[-1]) != 0.0:
        raise ValueError(f"euler integrates to sigma = 0; the last sigma is {float(sigmas[-1])}")
    for i in range(len(sigmas) - 1):
        s, s_next = _sig(sigmas[i], x), _sig(sigmas[i + 1], x)
        v = denoiser.velocity(x, s, cond, guidance=guidance, cache=cache, positions=positions)
        x = flow.euler_step(x, v, s, s_next)
        if callback is not None:
            callback(i, x)
    return x


def few_step(denoiser, x: Tensor, sigmas: Tensor, cond: Cond, *, cache: KVCache | None = None,
             positions: Tensor | None = None, guidance: Guidance | None = None,
             generator: torch.Generator | None = None, callback: Callable[[int, Tensor], None] | None = None,
             exit_step: int | None = None) -> Tensor:
    """x0 = G(x, s_j); x = (1 - s_{j+1}) x0 + s_{j+1} eps_fresh; output the last x0 (method.md §2).

    `exit_step = k` is the self-rollout gradient policy (method.md §7.2, §12.12): stop after step k and return
    that x0; steps before k run without grad, step k with whatever grad mode the caller has.
    """
    if float(sigmas[-1]) == 0.0:
        raise ValueError("few_step sigmas must not end at 0 (the last prediction is already x0)")
    last = len(sigmas) - 1 if exit_step is None else exit_step
    if not 0 <= last < len(sigmas):
        raise ValueError(f"exit_step {exit_step} is outside the {len(sigmas)}-step schedule")
    x0 = x
    for j in range(last + 1):
        s = _sig(sigmas[j], x)
        with torch.set_grad_enabled(torch.is_grad_enabled() and j == last):
            x0 = denoiser.x0(x, s, cond, guidance=guidance, cache=cache, positions=positions)
        if callback is not None:
            callback(j, x0)
        if j < last:
            eps = rng.randn(x.shape, generator).to(x)  # per sample under training (rng.py)
            x = flow.add_noise(x0, eps, _sig(sigmas[j + 1], x))
    return x0


SAMPLERS: dict[str, Sampler] = {"euler": euler, "few_step": few_step}
