"""The recordable environments: one `Environment` subclass each (its actions and keys, how to make it, its
exploration policy, state and view), registered in `ENVS`. `framecast record` (data/envs.py), the world-model
metrics and `framecast play` read nothing else about an environment (docs/world_model.md, environments).
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from ..errors import DataError


class RecordError(DataError):
    """A recording that cannot continue (a different manifest in the folder, a corrupt shard, no gymnasium)."""


def _missing(name: str, e: ImportError) -> RecordError:
    return RecordError(f"recording {name!r} needs gymnasium, minigrid and ale-py: pip install -e '.[world]' ({e})")


class Environment:
    """One recordable environment. Subclasses set the class attributes and implement make / state / view;
    the default policy and `blocked` suit any environment whose actions never fail visibly."""

    name: ClassVar[str]
    env_id: ClassVar[str]
    actions: ClassVar[tuple[str, ...]]      # framecast action ids 0..n-1; the null action is n
    env_actions: ClassVar[tuple[int, ...]]  # the environment's id for each
    keys: ClassVar[tuple[str, ...]]         # the browser key that plays each action (framecast play)
    state_fields: ClassVar[tuple[str, ...]]
    size: ClassVar[int]                     # default frame size

    @property
    def key_map(self) -> dict[str, str]:
        """Browser key -> action name, for the actions that have a key (`stay` is no key held)."""
        return {k: a for k, a in zip(self.keys, self.actions) if k}

    @property
    def null_action(self) -> int:
        return len(self.actions)

    def make(self, tile: int):
        """A fresh gymnasium environment rendering at `tile` px per cell where that applies."""
        raise NotImplementedError

    def policy_step(self, rng: np.random.Generator, prev: int, blocked: bool, turn_repeat: float = 0.0) -> int:
        """The next exploration action (a framecast action id) after `prev` (-1 at the start); `turn_repeat` is
        MiniGrid's (0 elsewhere)."""
        return int(rng.integers(0, len(self.actions)))

    def blocked(self, action: int, before: list[int], after: list[int]) -> bool:
        """Did `action` fail to do what it says (the policy reacts to it)? Never, unless a subclass knows."""
        return False

    def state(self, env) -> list[int]:
        """The true state of `env` now, one int per state field."""
        raise NotImplementedError

    def view(self, obs: Any, size: int, align: str = "center", resample: str = "area") -> np.ndarray:
        """The observation as a frame [3, size, size] uint8 (`align`: where a smaller view sits, ALIGNS;
        `resample`: how a larger screen is shrunk, RESAMPLES)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.env_id!r})"


class MiniGrid(Environment):
    """MiniGrid FourRooms, its egocentric 7x7-cell view padded to `size`. Exploration: mostly forward,
    sometimes stay, and a turn when the last forward did not move the agent (and, with `turn_repeat`, runs of
    turns)."""

    name = "minigrid"
    env_id = "MiniGrid-FourRooms-v0"
    actions = ("left", "right", "forward", "stay")
    env_actions = (0, 1, 2, 6)
    keys = ("ArrowLeft", "ArrowRight", "ArrowUp", "")
    state_fields = ("x", "y", "heading")
    size = 32

    def make(self, tile: int):
        try:
            import gymnasium as gym
            import minigrid  # noqa: F401  (registers the MiniGrid environments)
            from minigrid.wrappers import RGBImgPartialObsWrapper
        except ImportError as e:
            raise _missing(self.name, e) from e
        return RGBImgPartialObsWrapper(gym.make(self.env_id, max_steps=1_000_000), tile_size=tile)

    def policy_step(self, rng: np.random.Generator, prev: int, blocked: bool, turn_repeat: float = 0.0) -> int:
        # turn_repeat: the chance that a turn is followed by the same turn, so that runs of turns (four of them
        # close a loop) are in the data (docs/world_model.md, "Tokens on cells, runs of turns"). At 0 no extra
        # number is drawn: the recording is exactly the first policy's.
        if turn_repeat > 0 and prev in (0, 1) and rng.random() < turn_repeat:
            return prev
        if blocked:
            return int(rng.integers(0, 2))  # left or right
        return int(rng.choice(4, p=[0.15, 0.15, 0.55, 0.15]))

    def blocked(self, action: int, before: list[int], after: list[int]) -> bool:
        return self.actions[action] == "forward" and after == before

    def state(self, env) -> list[int]:
        u = env.unwrapped
        return [int(u.agent_pos[0]), int(u.agent_pos[1]), int(u.agent_dir)]

    def view(self, obs: Any, size: int, align: str = "center", resample: str = "area") -> np.ndarray:
        img = obs["image"]  # [h, w, 3] uint8
        h, w = img.shape[:2]
        if h > size or w > size:
            raise RecordError(f"the view is {h}x{w} px; size {size} is too small (use a smaller tile)")
        pad = np.zeros((size, size, 3), np.uint8)
        top, left = view_offset(align, size, h), view_offset(align, size, w)
        pad[top:top + h, left:left + w] = img
        return pad.transpose(2, 0, 1)  # [3, size, size]


class Breakout(Environment):
    """Atari Breakout, sticky actions off (replaying a seed and its actions gives the same frames), the
    210x160 screen resized to `size`. Exploration: sticky random actions, so the paddle travels and the ball
    gets launched."""

    name = "breakout"
    env_id = "ALE/Breakout-v5"
    actions = ("stay", "fire", "right", "left")
    env_actions = (0, 1, 2, 3)
    keys = ("", " ", "ArrowRight", "ArrowLeft")
    state_fields = ("paddle_x", "ball_x", "ball_y")
    size = 32  # the recipes' size: 4x4 RGB patches keep 48 values per token (configs/breakout.yaml)

    def make(self, tile: int):
        try:
            import ale_py
            import gymnasium as gym
        except ImportError as e:
            raise _missing(self.name, e) from e
        gym.register_envs(ale_py)
        # sticky actions off: replaying a seed and its actions gives the same frames (docs/world_model.md)
        return gym.make(self.env_id, repeat_action_probability=0.0, frameskip=4)

    def policy_step(self, rng: np.random.Generator, prev: int, blocked: bool, turn_repeat: float = 0.0) -> int:
        if prev >= 0 and rng.random() < 0.75:
            return prev
        return int(rng.choice(4, p=[0.2, 0.2, 0.3, 0.3]))

    def state(self, env) -> list[int]:
        ram = env.unwrapped.ale.getRAM()  # Breakout RAM: 72 paddle x, 99 ball x, 101 ball y
        return [int(ram[72]), int(ram[99]), int(ram[101])]

    def view(self, obs: Any, size: int, align: str = "center", resample: str = "area") -> np.ndarray:
        if resample == "max":
            return max_pool(obs, size).transpose(2, 0, 1).copy()
        if resample != "area":
            raise RecordError(f"unknown resampling {resample!r}; choose one of {RESAMPLES}")
        from PIL import Image

        img = Image.fromarray(obs).resize((size, size), Image.BILINEAR)  # 210x160 -> size x size, area-weighted
        return np.asarray(img).transpose(2, 0, 1).copy()


# How a screen larger than the frame is shrunk (Breakout). "area": Pillow's antialiased bilinear resize, the first
# recordings' (a manifest without the key): at 32 px Breakout's 4-row paddle becomes a faint line 0.6 px high and its
# 2x4-px ball nearly vanishes. "max": each frame pixel is the channel-wise maximum of its block of screen pixels, so
# an object of any size keeps its full colour on at least one pixel (docs/world_model.md, "Breakout").
RESAMPLES = ("area", "max")


def max_pool(img: np.ndarray, size: int) -> np.ndarray:
    """[H, W, C] -> [size, size, C]: the channel-wise maximum over near-equal blocks (H, W >= size)."""
    h, w = img.shape[:2]
    if h < size or w < size:
        raise RecordError(f"max resampling shrinks a screen; {h}x{w} px is smaller than size {size}")
    rows = (np.arange(size) * h) // size  # block starts: every screen row and column falls in exactly one block
    cols = (np.arange(size) * w) // size
    return np.maximum.reduceat(np.maximum.reduceat(img, rows, axis=0), cols, axis=1)


# Where MiniGrid's view (cells x tile px) sits in its size x size frame. "center": padded evenly, the first
# recordings' layout (28 px at offset 2 in 32, so every 4x4 patch straddles four cells). "tile": at the top-left
# corner, so that with patch = tile each token is exactly one cell and a step forward or a turn moves whole
# tokens (docs/world_model.md, "Tokens on cells, runs of turns"). A manifest without the key is "center".
ALIGNS = ("center", "tile")


def view_offset(align: str, size: int, view: int) -> int:
    """The pixel offset of a `view`-px view padded to `size` px under `align` (ALIGNS)."""
    if align not in ALIGNS:
        raise RecordError(f"unknown view alignment {align!r}; choose one of {ALIGNS}")
    return (size - view) // 2 if align == "center" else 0


ENVS: dict[str, Environment] = {e.name: e for e in (MiniGrid(), Breakout())}
EnvSpec = Environment  # the name before environments were classes


def get_env(name: str | Environment) -> Environment:
    """The registered environment `name` (an Environment is returned as is)."""
    if isinstance(name, Environment):
        return name
    if name not in ENVS:
        raise RecordError(f"unknown environment {name!r}; choose one of {sorted(ENVS)}")
    return ENVS[name]
