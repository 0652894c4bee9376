"""The one-call summary of a world model on held-out recorded episodes, and the real-frame ceilings and floors
that put it on a scale (docs/world_model.md, metrics).

`world_metrics` runs two open-loop rollouts with the same seed, under the recorded actions and under actions
shuffled across episodes (so a model that ignores actions scores exactly the same in both), and scores them
with pixels (PSNR, SSIM, ΔPSNR), the IDM and state probe, MiniGrid's colour-rule layout and loop closure.
`real_reference` scores the same frames and transitions of the real recording: the ceilings, and the floors
of shuffled actions, a constant state guess and a world that never moves.
"""

from __future__ import annotations

import torch

from ...generate import LoadedModel
from .layout import layout_scores
from .pixels import psnr, ssim, to_video
from .probes import (InverseDynamics, StateProbe, as_episodes, confusion, idm_predict, probe_predict, probe_scores,
                     turn_confusion)
from .rollouts import loop_closure, open_loop, shuffle_actions

Tensor = torch.Tensor


def _select(eval_episodes, episodes: int | None) -> tuple[Tensor, Tensor, Tensor, dict]:
    ep = as_episodes(eval_episodes)
    n = len(ep["actions"]) if episodes is None else episodes
    if not 2 <= n <= len(ep["actions"]):
        raise ValueError(f"need 2..{len(ep['actions'])} episodes (shuffling pairs them up), got {n}")
    return ep["frames"][:n], ep["actions"][:n], ep["state"][:n], ep["manifest"]


def real_reference(eval_episodes, idm: InverseDynamics, probe: StateProbe | None = None, *, context: int = 1,
                   episodes: int | None = None) -> dict:
    """Ceiling and floor on held-out REAL frames, for the same frames/transitions world_metrics scores
    (transitions into frames f >= context, frames f >= context):

    idm_acc: IDM on real transitions vs the recorded actions -- the ceiling (< 100 %: a blocked forward shows
      the same pair of frames as `stay`); idm_acc_shuffled: the same transitions vs actions shuffled across
      episodes -- the floor (what agreeing by chance with the action statistics gives);
    idm_confusion: counts [recorded action][IDM action]; turn_confused: the left / right turns read as the other;
    layout_acc_frozen, ahead_mae_frozen (MiniGrid): a world that never moves (the last context frame held);
    probe_<field>_{acc,mae}: probe on real frames (ceiling); ..._const: the best constant guess (floor)."""
    frames, actions, state, manifest = _select(eval_episodes, episodes)
    video = to_video(frames)  # [E, F, 3, H, W]
    pred = idm_predict(idm, video, start=context)  # [E, F-context]
    rec = actions[:, context:]
    out = {"idm_acc": float((pred == rec).float().mean()),
           "idm_acc_shuffled": float((pred == shuffle_actions(actions, context)[:, context:]).float().mean()),
           "idm_confusion": confusion(pred, rec, idm.num_actions)}
    out["turn_confused"] = turn_confusion(out["idm_confusion"], manifest["actions"])
    if manifest.get("env") == "minigrid":
        frozen = video[:, context - 1:context].expand_as(video[:, context:])
        out.update(layout_scores(frozen, video[:, context:], manifest, "_frozen"))
    if probe is not None:
        target = state[:, context:]  # [E, F-context, S]
        out.update(probe_scores(probe, probe_predict(probe, video[:, context:]), target))
        out.update(probe_scores(probe, probe.baseline.expand_as(target), target, "_const"))
    return out


def _pixel_scores(gen: Tensor, gen_s: Tensor, target: Tensor) -> dict:
    p, p_s = psnr(gen, target), psnr(gen_s, target)  # [E, F-context]
    s, s_s = ssim(gen, target), ssim(gen_s, target)
    return {"psnr": float(p.mean()), "psnr_shuffled": float(p_s.mean()), "delta_psnr": float(p.mean() - p_s.mean()),
            "ssim": float(s.mean()), "ssim_shuffled": float(s_s.mean()),
            "psnr_by_horizon": p.mean(0).tolist(), "psnr_shuffled_by_horizon": p_s.mean(0).tolist()}


def _idm_scores(idm: InverseDynamics, ctx: Tensor, gen: Tensor, gen_s: Tensor, actions: Tensor,
                shuffled: Tensor) -> dict:
    """The IDM on the transitions into every generated frame (the last context frame -> the first included)."""
    context = ctx.shape[1]
    full, full_s = torch.cat([ctx, gen], 1), torch.cat([ctx, gen_s], 1)  # [E, F, 3, H, W]
    pred, pred_s = idm_predict(idm, full, start=context), idm_predict(idm, full_s, start=context)  # [E, F-ctx]
    rec = actions[:, context:]
    return {"idm_acc": float((pred == rec).float().mean()), "idm_acc_shuffled": float((pred_s == rec).float().mean()),
            "idm_acc_followed_shuffled": float((pred_s == shuffled[:, context:]).float().mean()),
            "idm_acc_by_horizon": (pred == rec).float().mean(0).tolist(),
            "idm_confusion": confusion(pred, rec, idm.num_actions)}


def world_metrics(model: LoadedModel, eval_episodes, idm: InverseDynamics | None = None,
                  probe: StateProbe | None = None, *, context: int = 1, seed: int = 0, episodes: int | None = None,
                  loop_starts: int | None = 32, **sample_kw) -> dict:
    """All world-model metrics of one loaded model on held-out episodes (a folder or load_episodes dict).

    psnr / ssim (+ _shuffled, by_horizon), delta_psnr: fidelity and ΔPSNR controllability;
    idm_acc: IDM on generated transitions (context frame -> first generated frame included) vs the recorded
      actions that drove them;
    idm_acc_shuffled: the shuffled-action rollout read against the recorded actions -- the model's floor (the
      same number as idm_acc for a model that ignores actions);
    idm_acc_followed_shuffled: the shuffled-action rollout against the shuffled actions it was given;
    idm_acc_by_horizon, idm_confusion ([recorded action][IDM action] counts) for the recorded-action rollout;
    turn_confused: of its recorded left / right turns, the fraction the IDM reads as the other turn;
    layout_acc, ahead_mae (+ _shuffled, MiniGrid): the colour-rule layout of generated vs recorded frames;
    probe_<field>_{acc,mae}(+_shuffled): the probe on generated frames vs the recorded state;
    loop: loop_closure from the start frames of the first `loop_starts` episodes (MiniGrid; None elsewhere).
    `sample_kw` go to generate.sample. Compare with real_reference(...) for the ceilings and floors."""
    frames, actions, state, manifest = _select(eval_episodes, episodes)
    shuffled = shuffle_actions(actions, context)
    gen = open_loop(model, frames, actions, context=context, seed=seed, **sample_kw)
    gen_s = open_loop(model, frames, shuffled, context=context, seed=seed, **sample_kw)
    target = to_video(frames[:, context:])  # [E, F-context, 3, H, W]
    out = {"episodes": len(actions), "context": context, **_pixel_scores(gen, gen_s, target)}
    if idm is not None:
        out.update(_idm_scores(idm, to_video(frames[:, :context]), gen, gen_s, actions, shuffled))
        out["turn_confused"] = turn_confusion(out["idm_confusion"], manifest["actions"])
    minigrid = manifest.get("env") == "minigrid"
    if minigrid:
        out.update(layout_scores(gen, target, manifest))
        out.update(layout_scores(gen_s, target, manifest, "_shuffled"))
    if probe is not None:
        truth = state[:, context:]  # [E, F-context, S]
        out.update(probe_scores(probe, probe_predict(probe, gen), truth))
        out.update(probe_scores(probe, probe_predict(probe, gen_s), truth, "_shuffled"))
    out["loop"] = None
    if minigrid and loop_starts != 0:
        n = len(actions) if loop_starts is None else min(loop_starts, len(actions))
        out["loop"] = loop_closure(model, frames[:n, 0], action_names=manifest["actions"], seed=seed, **sample_kw)
    return out
