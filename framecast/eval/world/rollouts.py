"""Open-loop rollouts of a loaded world model on recorded episodes (docs/world_model.md, metrics).

Open loop: the model sees the first `context` frames of an episode and generates the rest under the recorded
actions (actions[:, f] leads to frame f), with no access to later ground truth. PSNR against the recorded
frames says how well it predicts; the same under actions shuffled across episodes gives
ΔPSNR = PSNR(real) - PSNR(shuffled), near 0 for a model that ignores its actions (controllability).

Every rollout samples latents with `generate.sample` as the checkpoint's SamplingSpec says and decodes them
through `LoadedModel.decode`, the one decode point, so every score here reads decoded pixels in [-1, 1].
"""

from __future__ import annotations

import torch

from ... import generate
from ...generate import LoadedModel
from ...models.conditioning import Cond
from .layout import LOOP_SEQUENCES, loop_scores
from .pixels import psnr, to_video

Tensor = torch.Tensor


def _check_frames(model: LoadedModel, frames: Tensor, actions: Tensor, context: int) -> None:
    E, F = actions.shape
    if frames.shape[:2] != (E, F) or not 0 < context < F:
        raise ValueError(f"episodes {tuple(frames.shape)} / actions {tuple(actions.shape)} with context {context}")
    if tuple(frames.shape[2:]) != tuple(model.spec.pixel_shape):
        raise ValueError(f"the model makes {tuple(model.spec.pixel_shape)} frames, the episodes have "
                         f"{tuple(frames.shape[2:])}")
    if model.codec.latent_frames(F) != F:
        raise ValueError(f"open loop pairs each frame with its action; codec {model.codec.name!r} changes the "
                         f"frame count ({F} -> {model.codec.latent_frames(F)})")


@torch.no_grad()
def open_loop(model: LoadedModel, frames: Tensor, actions: Tensor, *, context: int = 1, seed: int = 0,
              **sample_kw) -> Tensor:
    """Frames [context, F) of each episode (decoded, [E, F - context, 3, H, W] in [-1, 1]) generated from its
    first `context` recorded frames (uint8 [E, F, 3, H, W]) and its actions [E, F]. `sample_kw` go to
    generate.sample (e.g. steps=, guidance=, window= to override the checkpoint's)."""
    _check_frames(model, frames, actions, context)
    E, F = actions.shape
    ctx = model.codec.encode(to_video(frames[:, :context]))
    text = model.text_encoder.encode([""] * E)
    null_action = int(actions[:, 0].max())  # frame 0 of a recording carries the null action
    cond = Cond(text, actions)
    null = Cond(text.clone(), torch.full_like(actions, null_action))
    latents = generate.sample(model.denoiser, model.spec, cond, null, num_frames=F - context, seed=seed,
                              context=ctx, **sample_kw)
    return model.decode(latents)


def shuffle_actions(actions: Tensor, context: int = 1) -> Tensor:
    """Every episode gets the next episode's actions after its context (torch.roll: no episode keeps its own,
    and the action statistics are unchanged, so only the pairing with the frames is lost)."""
    perm = torch.roll(torch.arange(len(actions)), 1)
    out = actions.clone()
    out[:, context:] = actions[perm][:, context:]  # [E, F]
    return out


def controllability(model: LoadedModel, frames: Tensor, actions: Tensor, *, context: int = 1,
                    seed: int = 0, **sample_kw) -> dict:
    """Mean PSNR (and per horizon) under the recorded actions and under actions shuffled across episodes."""
    target = to_video(frames[:, context:])
    real = psnr(open_loop(model, frames, actions, context=context, seed=seed, **sample_kw), target)
    shuffled = shuffle_actions(actions, context)
    shuf = psnr(open_loop(model, frames, shuffled, context=context, seed=seed, **sample_kw), target)
    return {"psnr": float(real.mean()), "psnr_shuffled": float(shuf.mean()),
            "delta_psnr": float(real.mean() - shuf.mean()),
            "psnr_by_horizon": real.mean(0).tolist(), "psnr_shuffled_by_horizon": shuf.mean(0).tolist()}


def loop_closure(model: LoadedModel, start_frames: Tensor, *, action_names, turns: int = 4, seed: int = 0,
                 **sample_kw) -> dict:
    """From clean start views (uint8 [N, 3, H, W], one context frame each) generate open loop under
    [left x turns], [right x turns] and [stay x turns] in one batch, and score with layout.loop_scores.

    Only meaningful where `turns` turns are a full circle (MiniGrid: 4 x 90 degrees)."""
    names = list(action_names)
    missing = [a for a in LOOP_SEQUENCES if a not in names]
    if missing or turns < 2 or turns % 2:
        raise ValueError(f"loop closure needs actions {LOOP_SEQUENCES} (have {names}, missing {missing}) and an "
                         f"even number of turns, got {turns}")
    N = len(start_frames)
    null = len(names)
    acts = torch.tensor([[null] + [names.index(a)] * turns for a in LOOP_SEQUENCES])  # [3, 1+T]
    acts = acts.repeat_interleave(N, 0)  # [3N, 1+T]: N starts per sequence
    frames = start_frames[None].expand(len(LOOP_SEQUENCES), *start_frames.shape).flatten(0, 1)  # [3N, 3, H, W]
    frames = frames[:, None].expand(-1, turns + 1, -1, -1, -1)  # [3N, 1+T, 3, H, W]: only frame 0 is read
    gen = open_loop(model, frames, acts, context=1, seed=seed, **sample_kw)  # [3N, T, 3, H, W]
    return loop_scores(to_video(start_frames), dict(zip(LOOP_SEQUENCES, gen.split(N))))
