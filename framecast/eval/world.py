"""World-model metrics on held-out recorded episodes (issue: world model, point 3; research/world_model.md §4).

Open loop: the model sees the first `context` frames of an episode and generates the rest under the recorded
actions (actions[:, f] leads to frame f), with no access to later ground truth. PSNR against the recorded
frames per horizon says how well it predicts; the same with actions shuffled across episodes gives
ΔPSNR = PSNR(real) - PSNR(shuffled), which is near 0 for a model that ignores its actions (controllability).
"""

from __future__ import annotations

import torch

from ..models.conditioning import Cond

Tensor = torch.Tensor


def psnr(pred: Tensor, target: Tensor) -> Tensor:
    """PSNR in dB per frame for frames in [-1, 1] (peak-to-peak 2): [..., C, H, W] -> [...]."""
    if pred.shape != target.shape:
        raise ValueError(f"psnr of {tuple(pred.shape)} vs {tuple(target.shape)}")
    mse = ((pred.float() - target.float()) ** 2).flatten(-3).mean(-1)
    return 10 * torch.log10(4.0 / mse.clamp_min(1e-10))


def to_video(frames_uint8: Tensor) -> Tensor:
    return frames_uint8.float() / 127.5 - 1


@torch.no_grad()
def open_loop(model, meta: dict, text_encoder, frames: Tensor, actions: Tensor, *, context: int = 1,
              seed: int = 0) -> Tensor:
    """Generate frames [context, F) of each episode from its first `context` frames and its actions."""
    from ..pipeline import sample

    E, F = actions.shape
    if frames.shape[:2] != (E, F) or not 0 < context < F:
        raise ValueError(f"episodes {tuple(frames.shape)} / actions {tuple(actions.shape)} with context {context}")
    video = to_video(frames)
    text = text_encoder.encode([""] * E)
    null_action = int(actions[:, 0].max())
    cond = Cond(text, actions)
    null = Cond(text.clone(), torch.full_like(actions, null_action))
    return sample(model, meta, cond, null, num_frames=F - context, seed=seed, context=video[:, :context])


def controllability(model, meta: dict, text_encoder, frames: Tensor, actions: Tensor, *, context: int = 1,
                    seed: int = 0) -> dict:
    """Mean PSNR (and per horizon) under the recorded actions and under actions shuffled across episodes."""
    target = to_video(frames[:, context:])
    real = psnr(open_loop(model, meta, text_encoder, frames, actions, context=context, seed=seed), target)
    perm = torch.roll(torch.arange(len(actions)), 1)  # every episode gets another episode's actions
    shuffled_actions = actions.clone()
    shuffled_actions[:, context:] = actions[perm][:, context:]
    shuf = psnr(open_loop(model, meta, text_encoder, frames, shuffled_actions, context=context, seed=seed), target)
    return {"psnr": float(real.mean()), "psnr_shuffled": float(shuf.mean()),
            "delta_psnr": float(real.mean() - shuf.mean()),
            "psnr_by_horizon": real.mean(0).tolist(), "psnr_shuffled_by_horizon": shuf.mean(0).tolist()}
