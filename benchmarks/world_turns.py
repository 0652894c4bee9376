"""Does a MiniGrid world model tell left from right? One step from held-out start views under each turn.

    python benchmarks/world_turns.py runs/minigrid_long/stage1 runs/minigrid_long/dmd_2step --episodes 48

For the start view of each of the first `--episodes` episodes of the held-out recording seed (`--seed`, as
`framecast record` resets them), the real environment is stepped once with left and once with right. Each
model gets the start view and generates the next frame under left and under right (the same noise). Printed
per model and action: PSNR of the generated frame to the true view after that turn and to the true view after
the other turn (equal: the model draws "a turn", not this turn), and what the inverse-dynamics model (trained
on real transitions, cached) reads from the generated transition, next to what it reads from the real one.
Writes `--out` (JSON) when given. docs/world_model.md, "What limits the world model".
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from framecast.data.envs import episode_env_seed, get_env, read_manifest
from framecast.eval import world as W
from framecast.generate import load


def true_turns(episodes: int, seed: int, tile: int, size: int,
               align: str = "center") -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """Start views [N, 3, H, W] uint8 and the true views after left (0) and right (1) from each."""
    spec = get_env("minigrid")
    env = spec.make(tile)
    starts, after = [], {0: [], 1: []}
    for e in range(episodes):
        for a in (0, 1):
            obs, _ = env.reset(seed=episode_env_seed(seed, e))  # episode e's start, as `framecast record` has it
            if a == 0:
                starts.append(spec.view(obs, size, align))
            obs, *_ = env.step(spec.env_actions[a])
            after[a].append(spec.view(obs, size, align))
    return torch.from_numpy(np.stack(starts)), {a: torch.from_numpy(np.stack(v)) for a, v in after.items()}


def turn_scores(model, idm, start: torch.Tensor, after: dict[int, torch.Tensor], seed: int = 0) -> dict:
    names = get_env("minigrid").actions
    null = len(names)
    out = {}
    for a in (0, 1):
        frames = torch.stack([start, after[a]], 1)  # [N, 2, 3, H, W]: start, the true view after turn a
        actions = torch.tensor([[null, a]] * len(start))
        gen = W.open_loop(model, frames, actions, context=1, seed=seed)  # [N, 1, 3, H, W]
        video = torch.cat([W.to_video(frames[:, :1]), gen], 1)
        read = np.bincount(W.idm_predict(idm, video)[:, 0].numpy(), minlength=null).tolist()
        real = np.bincount(W.idm_predict(idm, W.to_video(frames))[:, 0].numpy(), minlength=null).tolist()
        out[names[a]] = {"psnr_to_this_turn": float(W.psnr(gen, W.to_video(after[a][:, None])).mean()),
                         "psnr_to_other_turn": float(W.psnr(gen, W.to_video(after[1 - a][:, None])).mean()),
                         "idm_reads": dict(zip(names, read)), "idm_reads_real": dict(zip(names, real))}
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("ckpts", nargs="+")
    p.add_argument("--episodes", type=int, default=48)
    p.add_argument("--seed", type=int, default=1, help="recording seed of the start views (1: the held-out set)")
    p.add_argument("--tile", type=int, default=4)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--train", default="data/minigrid_train", help="the real recording the IDM learns from")
    p.add_argument("--cache", default="runs/eval_cache")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    align = read_manifest(a.train)["align"]  # the view layout the models and the IDM learnt from
    start, after = true_turns(a.episodes, a.seed, a.tile, a.size, align)
    idm, _ = W.load_or_train_idm(a.train, a.cache)
    rows = {}
    print("| model | action | PSNR to this turn | to the other turn | IDM reads (left / right / forward / stay) |")
    print("|---|---|---|---|---|")
    for ck in a.ckpts:
        rows[ck] = turn_scores(load(ck), idm, start, after)
        for act, r in rows[ck].items():
            print(f"| {ck} | {act} | {r['psnr_to_this_turn']:.2f} | {r['psnr_to_other_turn']:.2f} | "
                  f"{' / '.join(str(v) for v in r['idm_reads'].values())} |")
    print("real transitions, IDM reads: " + "; ".join(
        f"{act}: {' / '.join(str(v) for v in r['idm_reads_real'].values())}" for act, r in rows[a.ckpts[0]].items()))
    if a.out:
        Path(a.out).write_text(json.dumps({"episodes": a.episodes, "seed": a.seed, "models": rows}, indent=1))


if __name__ == "__main__":
    main()
