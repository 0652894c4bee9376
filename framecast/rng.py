"""Explicit randomness that does not depend on how a batch is split (docs/scaling.md, "Same losses on any
number of GPUs").

A training step of global batch G is cut into micro-batches, over ranks (torchrun) and over gradient
accumulation. For the step to draw the same numbers however it is cut, every per-sample draw comes from a
generator of that *sample*, keyed by (seed, step, global sample index), and every batch-wide decision (the
exit step of DMD's self-rollout, which Self Forcing broadcasts to all ranks) from the step's shared
generator. `Draws` holds both; the helpers below take a `torch.Generator` (one stream, as before, for code
outside training) or `Draws` (one stream per row of the leading dimension):

    draws = Draws.for_samples(seed, step, range(4, 8), global_batch=8, shared_seed=s)  # rank 1 of 2, batch 4
    eps = randn((4, F, C, H, W), draws)                  # row i from sample 4+i's own generator
    e = int(torch.randint(0, 3, (1,), generator=draws))  # Draws is the shared stream: the same on every rank

So 2 ranks x batch B, 1 rank x 2 micro-batches of B and 1 rank x batch 2B draw identical numbers per sample.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch

Tensor = torch.Tensor
Gen = "torch.Generator | Draws | None"
MASK64 = (1 << 64) - 1


def mix(*words: int) -> int:
    """A 63-bit seed from integers (a SplitMix64 finaliser per word): nearby keys give unrelated streams."""
    h = 0x9E3779B97F4A7C15
    for w in words:
        h = (h ^ (int(w) & MASK64)) * 0xBF58476D1CE4E5B9 & MASK64
        h = (h ^ (h >> 27)) * 0x94D049BB133111EB & MASK64
        h ^= h >> 31
    return h & ((1 << 63) - 1)


class Draws(torch.Generator):
    """One generator per sample of a (micro-)batch; the object itself is the step's shared generator, so code
    that hands it to `torch.rand(..., generator=g)` directly still draws deterministic (batch-wide) numbers."""

    def __new__(cls, *args, **kwargs):  # torch.Generator.__new__ takes only a device
        return super().__new__(cls)

    def __init__(self, gens: list[torch.Generator], shared_seed: int, positions: list[int]) -> None:
        super().__init__()
        self.manual_seed(shared_seed)
        self.gens = gens
        self.positions = positions  # the samples' global positions in the run: step * global_batch + index

    @classmethod
    def for_samples(cls, seed: int, step: int, indices: Iterable[int], *, global_batch: int,
                    shared_seed: int) -> "Draws":
        idx = list(indices)
        gens = [torch.Generator().manual_seed(mix(seed, step, i)) for i in idx]
        return cls(gens, shared_seed, [step * global_batch + i for i in idx])

    def __len__(self) -> int:
        return len(self.gens)


def _rows(shape: Sequence[int], g: Draws) -> tuple[int, tuple[int, ...]]:
    shape = tuple(int(s) for s in shape)
    if not shape or shape[0] != len(g):
        raise ValueError(f"a per-sample draw needs the batch as its leading dimension ({len(g)} samples), "
                         f"got shape {shape}")
    return shape[0], shape[1:]


def randn(shape: Sequence[int], g: "torch.Generator | Draws | None", *, dtype: torch.dtype | None = None) -> Tensor:
    """Standard normal noise of `shape` on the CPU (moved by the caller)."""
    if not isinstance(g, Draws):
        return torch.randn(tuple(shape), generator=g, dtype=dtype)
    _, rest = _rows(shape, g)
    return torch.stack([torch.randn(rest, generator=gi, dtype=dtype) for gi in g.gens])


def rand(shape: Sequence[int], g: "torch.Generator | Draws | None") -> Tensor:
    if not isinstance(g, Draws):
        return torch.rand(tuple(shape), generator=g)
    _, rest = _rows(shape, g)
    return torch.stack([torch.rand(rest, generator=gi) for gi in g.gens])


def randint(low: int, high: int, shape: Sequence[int], g: "torch.Generator | Draws | None") -> Tensor:
    if not isinstance(g, Draws):
        return torch.randint(low, high, tuple(shape), generator=g)
    _, rest = _rows(shape, g)
    return torch.stack([torch.randint(low, high, rest, generator=gi) for gi in g.gens])


def multinomial(weights: Tensor, n: int, g: "torch.Generator | Draws | None") -> Tensor:
    """`n` draws (with replacement) of a category index from `weights` [K]."""
    if not isinstance(g, Draws):
        return torch.multinomial(weights, n, replacement=True, generator=g)
    if n != len(g):
        raise ValueError(f"{n} draws asked of {len(g)} per-sample generators")
    return torch.cat([torch.multinomial(weights, 1, replacement=True, generator=gi) for gi in g.gens])
