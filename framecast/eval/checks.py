"""Self-checks a run can print: does the streamed sample match the packed teacher-forcing forward?

`stream_vs_packed` records every cached denoising call of a streamed generation, then replays each one as
a packed teacher-forcing forward whose clean copy is the streamed output (architecture.md §4). The largest
difference is the number a user should see near fp32 round-off; anything larger means the cache, the
mask or the positions disagree.
"""

from __future__ import annotations

from typing import Any

import torch

from .. import flow
from ..models.attention import AttentionPlan
from ..models.conditioning import Cond
from ..models.denoiser import Guidance

Tensor = torch.Tensor


class Recorder:
    """A denoiser proxy that records (x, sigma, positions, v) of every call made with a cache."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.calls: list[tuple[Tensor, Tensor, Tensor, Tensor]] = []

    def velocity(self, x, sigma, cond, **kw):
        v = self.inner.velocity(x, sigma, cond, **kw)
        if kw.get("cache") is not None:
            self.calls.append((x.detach().clone(), sigma.detach().clone(), kw["positions"].clone(), v.detach().clone()))
        return v

    def x0(self, x, sigma, cond, **kw):
        return flow.v_to_x0(x, self.velocity(x, sigma, cond, **kw), sigma)

    def new_cache(self, **kw):
        return self.inner.new_cache(**kw)

    def commit(self, *args, **kw):
        return self.inner.commit(*args, **kw)


@torch.no_grad()
def stream_vs_packed(model, video: Tensor, calls, cond: Cond, *, block_size: int, window: int = 0, sink: int = 0,
                     guidance: Guidance | None = None) -> dict[str, Any]:
    """Max |v_stream - v_packed| over the recorded calls of a streamed generation of `video`."""
    B, F = video.shape[:2]
    plan = AttentionPlan("teacher_forcing", block_size, window, sink)
    worst = 0.0
    for x, sigma, pos, v in calls:
        xs, ss = video.clone(), torch.zeros(B, F, device=video.device)
        xs[:, pos], ss[:, pos] = x, sigma
        packed = model.velocity(xs, ss, cond, plan=plan, clean=video, guidance=guidance)
        worst = max(worst, float((packed[:, pos] - v).abs().max()))
    scale = float(torch.stack([c[3].abs().mean() for c in calls]).mean()) if calls else 0.0
    return {"max_abs_diff": worst, "calls": len(calls), "mean_abs_velocity": scale}
