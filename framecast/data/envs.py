"""Recorded episodes from real environments, for action-conditioned world models (docs/world_model.md).

    framecast record minigrid --out data/minigrid_train --episodes 2048 --frames 16 --seed 0
    framecast record breakout --out data/breakout_train --episodes 512 --frames 16 --seed 0

plays the environment with a light exploration policy and writes episodes as safetensors shards beside a
manifest (docs/world_model.md, environments):

    frames   [E, F, 3, H, W] uint8   the view after each step; frame 0 is the view after reset
    actions  [E, F] int64            actions[:, f] leads to frame f (architecture.md §3); frame 0 gets the null action
    state    [E, F, S] int64         true state per frame, named by manifest["state_fields"] (state probes,
                                     loop-closure checks): MiniGrid x, y, heading; Breakout paddle x, ball x, y

An environment is one `Environment` subclass in data/environments.py (its actions and keys, how to make it,
its exploration policy, state and view) in `ENVS`; recording, loading and `framecast play` read nothing else. Both have a "stay"
action (MiniGrid's `done`, a no-op in FourRooms; Breakout's NOOP): a player who holds no key gets a world that
waits, not a guess of a random action (the null action means "unknown action", for CFG).

Everything is deterministic per (seed, episode): episode e resets the environment with `episode_env_seed`
and draws its actions from Generator(seed, e), so a resumed recording writes exactly the shards an
uninterrupted one would have, and held-out data is just another seed. MiniGrid's egocentric 7x7-cell view is
rendered at `tile` px per cell and padded with black to `size` (centred, or on the tile grid with `align="tile"`;
`turn_repeat` makes its turns come in runs); Breakout's 210x160 screen is shrunk to
`size` x `size` (`resample="max"` keeps the paddle and the ball at full colour; docs/world_model.md, "Breakout").
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..schema import differing_keys, read_json
from .environments import (ALIGNS, ENVS, RESAMPLES, Breakout, Environment, EnvSpec,  # noqa: F401  (re-exported)
                           MiniGrid, RecordError, get_env, view_offset)


def episode_env_seed(seed: int, episode: int) -> int:
    """The environment reset seed of episode `episode` of a recording with `seed`."""
    return int(np.random.SeedSequence([seed, episode]).generate_state(1)[0])


def record_episode(env, seed: int, episode: int, frames: int, size: int,
                   environment: str | Environment = "minigrid", align: str = "center",
                   turn_repeat: float = 0.0, resample: str = "area") -> dict[str, np.ndarray]:
    """Episode `episode` of the recording with `seed`: frames [F, 3, size, size], actions [F], state [F, S]."""
    spec = get_env(environment)
    rng, env_seed = np.random.default_rng([seed, episode]), episode_env_seed(seed, episode)
    obs, _ = env.reset(seed=env_seed)
    out_f, out_a, out_s = [spec.view(obs, size, align, resample)], [spec.null_action], [spec.state(env)]
    blocked, a = False, -1
    for _ in range(frames - 1):
        a = spec.policy_step(rng, a, blocked, turn_repeat)
        before = spec.state(env)
        obs, _, terminated, truncated, _ = env.step(spec.env_actions[a])
        blocked = spec.blocked(a, before, spec.state(env))
        if terminated or truncated:  # Breakout game over inside an episode: start a new game, keep recording
            obs, _ = env.reset(seed=env_seed + len(out_f))
        out_f.append(spec.view(obs, size, align, resample)), out_a.append(a), out_s.append(spec.state(env))
    return {"frames": np.stack(out_f), "actions": np.array(out_a, np.int64), "state": np.array(out_s, np.int64)}


def _manifest(spec: Environment, out: Path, **settings: Any) -> dict[str, Any]:
    """The recording's manifest; a different (or unreadable) one already in `out` is an error. Nothing is written."""
    manifest = {"env": spec.name, "env_id": spec.env_id, "actions": list(spec.actions),
                "null_action": spec.null_action, "state_fields": list(spec.state_fields), **settings}
    if (out / "manifest.json").exists():
        old = read_manifest(out)
        if diff := differing_keys(old, manifest):
            raise RecordError(f"{out} holds a different recording ({diff[0]}: {old.get(diff[0])!r} there, "
                              f"{manifest.get(diff[0])!r} asked); choose another --out")
    return manifest


def _check_settings(spec: Environment, size: int | None, **ints: Any) -> int:
    """The frame size (the environment's default for None); a RecordError for a setting out of range."""
    for k, v in ints.items():
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise RecordError(f"{k} must be a positive integer, got {v!r}")
    size = spec.size if size is None else size
    if not isinstance(size, int) or size < 8:
        raise RecordError(f"size must be an integer >= 8, got {size!r}")
    return size


def _shard_len(manifest: dict[str, Any], i: int) -> int:
    return min(manifest["shard_size"], manifest["episodes"] - i * manifest["shard_size"])


def _todo(out: Path, manifest: dict[str, Any]) -> list[int]:
    """The shards still to record; every shard already there is checked first (a damaged one is an error)."""
    todo = []
    for i in range(-(-manifest["episodes"] // manifest["shard_size"])):
        path = out / f"shard_{i:05d}.safetensors"
        if path.exists():
            read_shard(path, manifest, _shard_len(manifest, i), load=False)
        else:
            todo.append(i)
    return todo


def record(env_name: str, out: str | Path, *, episodes: int, frames: int, seed: int = 0, tile: int = 4,
           size: int | None = None, shard_size: int = 64, align: str = "center", turn_repeat: float = 0.0,
           resample: str = "area", progress: bool = True) -> Path:
    """Record (or finish recording) `episodes` episodes into `out`; returns the manifest path.

    Everything is checked before anything is written: the settings, the manifest already in `out` (the same
    recording) and every shard already there (readable, complete, of the recording's shapes)."""
    from tqdm.auto import tqdm

    spec = get_env(env_name)
    size = _check_settings(spec, size, episodes=episodes, frames=frames, tile=tile, shard_size=shard_size)
    if align not in ALIGNS:  # checked before anything is written (view_offset would only refuse it mid-recording)
        raise RecordError(f"unknown view alignment {align!r}; choose one of {ALIGNS}")
    if align != "center" and not isinstance(spec, MiniGrid):
        raise RecordError(f"align={align!r} places MiniGrid's padded view; {spec.name} frames are resized, not padded")
    if resample not in RESAMPLES:
        raise RecordError(f"unknown resampling {resample!r}; choose one of {RESAMPLES}")
    if resample != "area" and isinstance(spec, MiniGrid):
        raise RecordError(f"resample={resample!r} shrinks a screen; {spec.name}'s view is padded, not resized")
    if not (isinstance(turn_repeat, (int, float)) and 0 <= turn_repeat < 1):
        raise RecordError(f"turn_repeat must be a probability in [0, 1), got {turn_repeat!r}")
    if turn_repeat and not isinstance(spec, MiniGrid):
        raise RecordError(f"turn_repeat is MiniGrid's exploration setting; {spec.name} has its own policy")
    if (out := Path(out)).exists() and not out.is_dir():
        raise RecordError(f"--out {out} is not a folder")
    manifest = _manifest(spec, out, episodes=episodes, frames=frames, seed=seed, tile=tile, size=size,
                         shard_size=shard_size, align=align, turn_repeat=float(turn_repeat), resample=resample)
    todo = _todo(out, manifest) if out.is_dir() else list(range(-(-episodes // shard_size)))
    env = spec.make(tile)
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "manifest.json").exists():
        (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    done = episodes - sum(_shard_len(manifest, i) for i in todo)
    bar = tqdm(total=episodes, initial=done, desc=f"record {spec.name}", unit="ep", disable=not progress)
    for i in todo:
        eps = range(i * shard_size, min((i + 1) * shard_size, episodes))
        rec = [record_episode(env, seed, e, frames, size, spec, align, turn_repeat, resample) for e in eps]
        tensors = {k: torch.from_numpy(np.ascontiguousarray(np.stack([r[k] for r in rec]))) for k in SHARD_KEYS}
        tmp = out / f"shard_{i:05d}.tmp"
        save_file(tensors, str(tmp))
        tmp.replace(out / f"shard_{i:05d}.safetensors")  # atomic: a cut-off run never leaves half a shard
        bar.update(len(eps))
    bar.close()
    return out / "manifest.json"


SHARD_KEYS = ("frames", "actions", "state")
MANIFEST_INTS = {"episodes": 1, "frames": 1, "shard_size": 1, "null_action": 0}  # required key -> its minimum


def read_manifest(root: str | Path) -> dict[str, Any]:
    """The manifest of a recording, or a RecordError naming the file (unreadable, truncated, keys missing)."""
    path = Path(root) / "manifest.json"
    manifest = read_json(path, "recording manifest", RecordError)
    if not isinstance(manifest, dict):
        raise RecordError(f"recording manifest {path} is not a JSON object (got {type(manifest).__name__})")
    if missing := [k for k in MANIFEST_INTS if k not in manifest]:
        raise RecordError(f"recording manifest {path} lacks {missing}: truncated, or not written by framecast record")
    for k, least in MANIFEST_INTS.items():
        v = manifest[k]
        if not isinstance(v, int) or isinstance(v, bool) or v < least:
            raise RecordError(f"recording manifest {path}: {k} must be an integer >= {least}, got {v!r}")
    manifest.setdefault("align", "center")  # recordings made before `align`, `turn_repeat` and `resample` existed
    manifest.setdefault("turn_repeat", 0.0)
    manifest.setdefault("resample", "area")
    if manifest["align"] not in ALIGNS:
        raise RecordError(f"recording manifest {path}: align must be one of {ALIGNS}, got {manifest['align']!r}")
    if manifest["resample"] not in RESAMPLES:
        raise RecordError(f"recording manifest {path}: resample must be one of {RESAMPLES}, "
                          f"got {manifest['resample']!r}")
    return manifest


def _shard_problem(found: dict[str, tuple[list[int], str]], manifest: dict[str, Any], n: int) -> str | None:
    """What is wrong with a shard holding `found` (key -> (shape, dtype)) for `n` episodes, or None."""
    if missing := [k for k in SHARD_KEYS if k not in found]:
        return f"lacks {missing} (it holds {sorted(found)})"
    F, size, fields = manifest["frames"], manifest.get("size"), manifest.get("state_fields")
    hw = [size, size] if isinstance(size, int) else list(found["frames"][0][3:])
    S = [len(fields)] if isinstance(fields, list) else list(found["state"][0][2:])
    want = {"frames": ([n, F, 3, *hw], "U8"), "actions": ([n, F], "I64"), "state": ([n, F, *S], "I64")}
    for k, (shape, dtype) in want.items():
        if list(found[k][0]) != shape or found[k][1] != dtype:
            return f"holds {k} {list(found[k][0])} {found[k][1]}, not {shape} {dtype} (from its manifest)"
    return None


def read_shard(path: Path, manifest: dict[str, Any], n: int, *, load: bool = True) -> dict[str, torch.Tensor]:
    """Shard `path` of a recording, checked against its manifest (`n` episodes): its tensors (none unless
    `load`), or a RecordError naming the file if it is unreadable, truncated or of other shapes."""
    try:
        with safe_open(str(path), framework="pt") as f:
            found = {k: (f.get_slice(k).get_shape(), f.get_slice(k).get_dtype()) for k in f.keys()}
            problem = _shard_problem(found, manifest, n)
            tensors = {k: f.get_tensor(k) for k in SHARD_KEYS} if load and problem is None else {}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise RecordError(f"recording shard {path} is unreadable or truncated ({str(e).splitlines()[0]}); "
                          f"delete it and re-run framecast record") from None
    if problem:
        raise RecordError(f"recording shard {path} {problem}; delete it and re-run framecast record")
    return tensors


def load_episodes(root: str | Path) -> dict[str, torch.Tensor]:
    """All shards of a finished recording, concatenated: frames [E, F, 3, H, W] uint8, actions [E, F], state
    [E, F, S], and the manifest."""
    root = Path(root)
    manifest = read_manifest(root)
    parts = []
    for i in range(-(-manifest["episodes"] // manifest["shard_size"])):
        p = root / f"shard_{i:05d}.safetensors"
        if not p.exists():
            raise RecordError(f"{root} is incomplete: {p.name} is missing (re-run framecast record to finish it)")
        parts.append(read_shard(p, manifest, _shard_len(manifest, i)))
    out = {k: torch.cat([p[k] for p in parts]) for k in SHARD_KEYS}
    if bool(((out["actions"] < 0) | (out["actions"] > manifest["null_action"])).any()):
        raise RecordError(f"recording {root} holds actions outside 0..{manifest['null_action']} (the null action)")
    out["manifest"] = manifest
    return out
