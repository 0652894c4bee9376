"""Recorded episodes from real environments, for action-conditioned world models (issue: world model).

    framecast record minigrid --out data/minigrid_train --episodes 2048 --frames 16 --seed 0
    framecast record breakout --out data/breakout_train --episodes 512 --frames 16 --seed 0

plays the environment with a light exploration policy and writes episodes as safetensors shards beside a
manifest (docs/world_model.md, environments):

    frames   [E, F, 3, H, W] uint8   the view after each step; frame 0 is the view after reset
    actions  [E, F] int64            actions[:, f] leads to frame f (architecture.md §3); frame 0 gets the null action
    state    [E, F, S] int64         true state per frame, named by manifest["state_fields"] (state probes,
                                     loop-closure checks): MiniGrid x, y, heading; Breakout paddle x, ball x, y

Both environments have a "stay" action (MiniGrid's `done`, a no-op in FourRooms; Breakout's NOOP), so a
player who holds no key gets a world that waits, not the model's guess of a random action (the null action
means "unknown action", for CFG).

Everything is deterministic per (seed, episode): episode e resets the environment with seed (seed, e) and
draws its actions from Generator(seed, e), so a resumed recording writes exactly the shards an uninterrupted
one would have, and held-out data is just another seed. MiniGrid's egocentric 7x7-cell view is rendered at
`tile` px per cell (28 px at tile 4) and padded with black to `size`; Breakout's 210x160 screen is resized to
`size` x `size` (64 keeps the ball visible; docs/world_model.md, environments).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file


class RecordError(RuntimeError):
    """A recording that cannot continue (a different manifest in the folder, a corrupt shard, no gymnasium)."""


@dataclass(frozen=True)
class EnvSpec:
    env_id: str
    actions: tuple[str, ...]     # framecast action ids 0..n-1; the null action is n
    env_actions: tuple[int, ...]  # the environment's id for each
    keys: tuple[str, ...]         # the browser key that plays each action (framecast play)
    state_fields: tuple[str, ...]
    size: int                     # default frame size

    @property
    def key_map(self) -> dict[str, str]:
        """Browser key -> action name, for the actions that have a key (`stay` is no key held)."""
        return {k: a for k, a in zip(self.keys, self.actions) if k}


ENVS = {
    "minigrid": EnvSpec("MiniGrid-FourRooms-v0", ("left", "right", "forward", "stay"), (0, 1, 2, 6),
                        ("ArrowLeft", "ArrowRight", "ArrowUp", ""), ("x", "y", "heading"), 32),
    "breakout": EnvSpec("ALE/Breakout-v5", ("stay", "fire", "right", "left"), (0, 1, 2, 3),
                        ("", " ", "ArrowRight", "ArrowLeft"), ("paddle_x", "ball_x", "ball_y"), 64),
}


def _make_env(name: str, tile: int):
    try:
        import gymnasium as gym
        if name == "minigrid":
            import minigrid  # noqa: F401  (registers the MiniGrid environments)
            from minigrid.wrappers import RGBImgPartialObsWrapper
        else:
            import ale_py
    except ImportError as e:
        raise RecordError(f"recording {name!r} needs gymnasium, minigrid and ale-py: pip install -e '.[world]' "
                          f"({e})") from e
    if name == "minigrid":
        return RGBImgPartialObsWrapper(gym.make(ENVS[name].env_id, max_steps=1_000_000), tile_size=tile)
    gym.register_envs(ale_py)
    # sticky actions off: replaying a seed and its actions gives the same frames (docs/world_model.md, environments)
    return gym.make(ENVS[name].env_id, repeat_action_probability=0.0, frameskip=4)


def _policy_step(name: str, rng: np.random.Generator, prev: int, blocked: bool) -> int:
    """Exploration. MiniGrid: mostly forward, sometimes stay, turn when the last forward did not move the
    agent. Breakout: sticky random actions, so the paddle travels and the ball gets launched."""
    if name == "minigrid":
        if blocked:
            return int(rng.integers(0, 2))  # left or right
        return int(rng.choice(4, p=[0.15, 0.15, 0.55, 0.15]))
    if prev >= 0 and rng.random() < 0.75:
        return prev
    return int(rng.choice(4, p=[0.2, 0.2, 0.3, 0.3]))


def _state(name: str, env) -> list[int]:
    u = env.unwrapped
    if name == "minigrid":
        return [int(u.agent_pos[0]), int(u.agent_pos[1]), int(u.agent_dir)]
    ram = u.ale.getRAM()  # Breakout RAM: 72 paddle x, 99 ball x, 101 ball y
    return [int(ram[72]), int(ram[99]), int(ram[101])]


def _view(name: str, obs: Any, size: int) -> np.ndarray:
    if name == "minigrid":
        img = obs["image"]  # [h, w, 3] uint8
        h, w = img.shape[:2]
        if h > size or w > size:
            raise RecordError(f"the view is {h}x{w} px; size {size} is too small (use a smaller tile)")
        pad = np.zeros((size, size, 3), np.uint8)
        top, left = (size - h) // 2, (size - w) // 2
        pad[top:top + h, left:left + w] = img
        return pad.transpose(2, 0, 1)  # [3, size, size]
    from PIL import Image

    img = Image.fromarray(obs).resize((size, size), Image.BILINEAR)  # 210x160 -> size x size
    return np.asarray(img).transpose(2, 0, 1).copy()


def record_episode(env, seed: int, episode: int, frames: int, size: int,
                   name: str = "minigrid") -> dict[str, np.ndarray]:
    spec = ENVS[name]
    rng = np.random.default_rng([seed, episode])
    env_seed = int(np.random.SeedSequence([seed, episode]).generate_state(1)[0])
    obs, _ = env.reset(seed=env_seed)
    out_f, out_a, out_s = [_view(name, obs, size)], [len(spec.actions)], [_state(name, env)]
    blocked, a = False, -1
    for _ in range(frames - 1):
        a = _policy_step(name, rng, a, blocked)
        before = _state(name, env)
        obs, _, terminated, truncated, _ = env.step(spec.env_actions[a])
        blocked = name == "minigrid" and spec.actions[a] == "forward" and _state(name, env) == before
        if terminated or truncated:  # Breakout game over inside an episode: start a new game, keep recording
            obs, _ = env.reset(seed=env_seed + len(out_f))
        out_f.append(_view(name, obs, size))
        out_a.append(a)
        out_s.append(_state(name, env))
    return {"frames": np.stack(out_f), "actions": np.array(out_a, np.int64), "state": np.array(out_s, np.int64)}


def record(env_name: str, out: str | Path, *, episodes: int, frames: int, seed: int = 0, tile: int = 4,
           size: int | None = None, shard_size: int = 64, progress: bool = True) -> Path:
    """Record (or finish recording) `episodes` episodes into `out`; returns the manifest path."""
    from tqdm.auto import tqdm

    if env_name not in ENVS:
        raise RecordError(f"unknown environment {env_name!r}; choose one of {sorted(ENVS)}")
    for k, v in dict(episodes=episodes, frames=frames, tile=tile, shard_size=shard_size).items():
        if not isinstance(v, int) or v < 1:
            raise RecordError(f"{k} must be a positive integer, got {v!r}")
    size = ENVS[env_name].size if size is None else size
    if not isinstance(size, int) or size < 8:
        raise RecordError(f"size must be an integer >= 8, got {size!r}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    spec = ENVS[env_name]
    manifest = {"env": env_name, "env_id": spec.env_id, "actions": list(spec.actions),
                "null_action": len(spec.actions), "state_fields": list(spec.state_fields), "episodes": episodes,
                "frames": frames, "seed": seed, "tile": tile, "size": size, "shard_size": shard_size}
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
        rec = [record_episode(env, seed, e, frames, size, env_name) for e in eps]
        tensors = {k: torch.from_numpy(np.ascontiguousarray(np.stack([r[k] for r in rec])))
                   for k in ("frames", "actions", "state")}
        tmp = out / f"shard_{i:05d}.tmp"
        save_file(tensors, str(tmp))
        tmp.replace(out / f"shard_{i:05d}.safetensors")  # atomic: a cut-off run never leaves half a shard
        bar.update(len(eps))
    bar.close()
    return path


def load_episodes(root: str | Path) -> dict[str, torch.Tensor]:
    """All shards of a finished recording, concatenated: frames [E, F, 3, H, W] uint8, actions [E, F], state
    [E, F, S], and the manifest."""
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
    out = {k: torch.cat([p[k] for p in parts]) for k in ("frames", "actions", "state")}
    out["manifest"] = manifest
    return out
