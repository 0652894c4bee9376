"""Quality against play length (docs/world_model.md, "Long play"): one long open-loop stream per episode,
scored per bucket of frames against the real environment replaying the same actions.

A long recording (`framecast record minigrid --frames 1001`) is a scripted policy (the recording's exploration
policy) played in the real environment. The model gets its first frame and streams the rest under its
actions with the rolling window `framecast play` uses (`SamplingSpec.stream_window`), exactly as a player's
session would. Each bucket of `bucket` frames gets:

* layout_acc: the colour-rule layout (layout.py) of the generated frames vs the real ones at the same step;
* idm_acc: the inverse-dynamics model on the generated transitions vs the actions that drove them (does the
  world still answer its keys?), next to real_idm_acc, the same IDM on the real transitions (its ceiling);
* psnr to the real frames.

Layout against the real environment falls to its open-loop level within the first few frames (part of every
later view was never shown, ceiling.py); what this measures is whether it keeps falling: a model whose frames
degrade with play length scores lower in the last bucket than in the first.

Recordings whose episode restarted (MiniGrid's goal reached: the agent jumps to a new map) are cut at the
restart: a world model cannot predict a new map, and frames after it would score the reset, not the model.
"""

from __future__ import annotations

import torch

from ...generate import LoadedModel
from .layout import layout_scores
from .pixels import psnr, to_video
from .probes import InverseDynamics, idm_predict
from .rollouts import open_loop

Tensor = torch.Tensor


def continuous_length(state: Tensor) -> int:
    """Frames before the first restart of a MiniGrid episode [F, >=2] (x, y first): a step that moves the agent
    by more than one cell is a reset onto a new map."""
    jump = (state[1:, :2] - state[:-1, :2]).abs().sum(-1) > 1  # [F-1]
    return int(jump.float().argmax()) + 1 if bool(jump.any()) else int(state.shape[0])


@torch.no_grad()
def long_play(model: LoadedModel, frames: Tensor, actions: Tensor, manifest: dict, *, idm: InverseDynamics | None,
              bucket: int = 100, seed: int = 0, window: int | None = None, **sample_kw) -> dict:
    """Stream episodes [E, F] (uint8 frames [E, F, 3, H, W], actions [E, F]) open loop from their first frame and
    score frames 1..F-1 per bucket of `bucket` frames. Returns {"buckets": [{start, end, layout_acc, idm_acc,
    real_idm_acc, psnr}], "window", "episodes", "frames"}."""
    E, F = actions.shape
    if F < 2 or bucket < 1:
        raise ValueError(f"long play needs episodes of >= 2 frames and bucket >= 1, got {F} frames, bucket {bucket}")
    win = model.spec.stream_window(window)
    gen = open_loop(model, frames, actions, context=1, seed=seed, window=win, **sample_kw)  # [E, F-1, 3, H, W]
    real = to_video(frames)  # [E, F, 3, H, W]
    video = torch.cat([real[:, :1], gen], 1)  # the context frame, then the stream
    pred = idm_predict(idm, video) if idm is not None else None  # [E, F-1]: transition f-1 -> f
    real_pred = idm_predict(idm, real) if idm is not None else None
    minigrid = manifest.get("env") == "minigrid"
    rows = []
    for s in range(1, F, bucket):
        e = min(s + bucket, F)
        row = {"start": s, "end": e, "psnr": float(psnr(gen[:, s - 1:e - 1], real[:, s:e]).mean())}
        if minigrid:
            row["layout_acc"] = layout_scores(gen[:, s - 1:e - 1], real[:, s:e], manifest)["layout_acc"]
        if pred is not None:
            row["idm_acc"] = float((pred[:, s - 1:e - 1] == actions[:, s:e]).float().mean())
            row["real_idm_acc"] = float((real_pred[:, s - 1:e - 1] == actions[:, s:e]).float().mean())
        rows.append(row)
    return {"buckets": rows, "window": win, "episodes": E, "frames": F}


def drift(result: dict, key: str) -> float:
    """The last bucket's `key` relative to the first's, minus 1 (-0.1: 10 % worse at the end of play)."""
    first, last = result["buckets"][0][key], result["buckets"][-1][key]
    return last / first - 1 if first else float("nan")
