"""Recorded episodes from a real environment, for action-conditioned world models (issue: world model).

`framecast record minigrid --out data/minigrid_train --episodes 512 --frames 16 --seed 0` plays MiniGrid
(egocentric RGB view, actions left / right / forward; research/world_model.md §3.5) with a light exploration
policy and writes episodes as safetensors shards beside a manifest:

    frames   [E, F, 3, H, W] uint8   the view after each step; frame 0 is the view after reset
    actions  [E, F] int64            actions[:, f] leads to frame f (design §3); frame 0 gets the null action
    pose     [E, F, 3] int64         agent x, y, heading per frame (for state probes and loop-closure checks)

Everything is deterministic per (seed, episode): episode e resets the environment with seed (seed, e) and
draws its actions from Generator(seed, e), so a resumed recording writes exactly the shards an uninterrupted
one would have, and held-out data is just another seed. The egocentric 7x7-cell view is rendered at `tile`
px per cell (28 px at tile 4) and padded with black to `size`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

ENVS = {"minigrid": "MiniGrid-FourRooms-v0"}
ACTIONS = {"minigrid": ("left", "right", "forward")}  # MiniGrid's action ids 0, 1, 2


class RecordError(RuntimeError):
    """A recording that cannot continue (a different manifest in the folder, a corrupt shard, no gymnasium)."""


def _make_env(name: str, tile: int):
    try:
        import gymnasium as gym
        import minigrid  # noqa: F401  (registers the MiniGrid environments)
        from minigrid.wrappers import RGBImgPartialObsWrapper
    except ImportError as e:
        raise RecordError(f"recording {name!r} needs gymnasium and minigrid: pip install -e '.[world]' ({e})") from e
    return RGBImgPartialObsWrapper(gym.make(ENVS[name], max_steps=1_000_000), tile_size=tile)


def _policy_step(rng: np.random.Generator, blocked: bool) -> int:
    """Exploration: mostly forward, turn when the last forward did not move the agent."""
    if blocked:
        return int(rng.integers(0, 2))  # left or right
    return int(rng.choice(3, p=[0.2, 0.2, 0.6]))


def record_episode(env, seed: int, episode: int, frames: int, size: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([seed, episode])
    obs, _ = env.reset(seed=int(np.random.SeedSequence([seed, episode]).generate_state(1)[0]))
    null = len(ACTIONS["minigrid"])
    out_f, out_a, out_p = [], [], []
    blocked = False

    def pose():
        u = env.unwrapped
        return [int(u.agent_pos[0]), int(u.agent_pos[1]), int(u.agent_dir)]

    def view(o):
        img = o["image"]  # [h, w, 3] uint8
        h, w = img.shape[:2]
        if h > size or w > size:
            raise RecordError(f"the view is {h}x{w} px; size {size} is too small (use a smaller tile)")
        pad = np.zeros((size, size, 3), np.uint8)
        top, left = (size - h) // 2, (size - w) // 2
        pad[top:top + h, left:left + w] = img
        return pad.transpose(2, 0, 1)  # [3, size, size]

    out_f.append(view(obs))
    out_a.append(null)
    out_p.append(pose())
    for _ in range(frames - 1):
        a = _policy_step(rng, blocked)
        before = pose()
        obs, *_ = env.step(a)
        blocked = a == 2 and pose() == before
        out_f.append(view(obs))
        out_a.append(a)
        out_p.append(pose())
    return {"frames": np.stack(out_f), "actions": np.array(out_a, np.int64), "pose": np.array(out_p, np.int64)}


def record(env_name: str, out: str | Path, *, episodes: int, frames: int, seed: int = 0, tile: int = 4,
           size: int = 32, shard_size: int = 64, progress: bool = True) -> Path:
    """Record (or finish recording) `episodes` episodes into `out`; returns the manifest path."""
    from tqdm.auto import tqdm

    if env_name not in ENVS:
        raise RecordError(f"unknown environment {env_name!r}; choose one of {sorted(ENVS)}")
    for k, v in dict(episodes=episodes, frames=frames, tile=tile, size=size, shard_size=shard_size).items():
        if not isinstance(v, int) or v < 1:
            raise RecordError(f"{k} must be a positive integer, got {v!r}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    manifest = {"env": env_name, "env_id": ENVS[env_name], "actions": list(ACTIONS[env_name]),
                "null_action": len(ACTIONS[env_name]), "episodes": episodes, "frames": frames, "seed": seed,
                "tile": tile, "size": size, "shard_size": shard_size}
    path = out / "manifest.json"
    if path.exists():
        old = json.loads(path.read_text())
        diff = sorted(k for k in set(old) | set(manifest) if old.get(k) != manifest.get(k))
        if diff:
            raise RecordError(f"{out} holds a different recording ({diff[0]}: {old.get(diff[0])!r} there, "
                              f"{manifest.get(diff[0])!r} asked); choose another --out")
    else:
        path.write_text(json.dumps(manifest, indent=1))
    env = _make_env(env_name, tile)
    shards = -(-episodes // shard_size)
    todo = [i for i in range(shards) if not (out / f"shard_{i:05d}.safetensors").exists()]
    done = episodes - sum(min(shard_size, episodes - i * shard_size) for i in todo)
    bar = tqdm(total=episodes, initial=done, desc=f"record {env_name}", unit="ep", disable=not progress)
    for i in todo:
        eps = range(i * shard_size, min((i + 1) * shard_size, episodes))
        rec = [record_episode(env, seed, e, frames, size) for e in eps]
        tensors = {k: torch.from_numpy(np.ascontiguousarray(np.stack([r[k] for r in rec]))) for k in ("frames", "actions", "pose")}
        tmp = out / f"shard_{i:05d}.tmp"
        save_file(tensors, str(tmp))
        tmp.replace(out / f"shard_{i:05d}.safetensors")  # atomic: a cut-off run never leaves half a shard
        bar.update(len(eps))
    bar.close()
    return path


def load_episodes(root: str | Path) -> dict[str, torch.Tensor]:
    """All shards of a finished recording, concatenated: frames [E, F, 3, H, W] uint8, actions [E, F], pose."""
    root = Path(root)
    try:
        manifest = json.loads((root / "manifest.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise RecordError(f"{root} has no readable manifest.json ({e})") from None
    n = -(-manifest["episodes"] // manifest["shard_size"])
    parts = []
    for i in range(n):
        p = root / f"shard_{i:05d}.safetensors"
        if not p.exists():
            raise RecordError(f"{root} is incomplete: {p.name} is missing (re-run framecast record to finish it)")
        try:
            parts.append(load_file(str(p)))
        except Exception as e:
            raise RecordError(f"{p} is unreadable ({e}); delete it and re-run framecast record") from None
    return {k: torch.cat([p[k] for p in parts]) for k in ("frames", "actions", "pose")}
