"""What every player of one `framecast play` server shares: the model and its sampling spec, its action names
and keys (world models) or its first prompt (text-to-video), and the start frames; `load_world` builds it from
a checkpoint. The server (server.py) creates one `stream.Session` per player from it."""

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError
from ..models.codecs import uint8_to_pixels
from ..spec import SamplingSpec
from ..stream import Session, SessionError


@dataclass
class World:
    """What every session of one server shares: the model, its sampling spec, action names and keys, the start
    frames."""

    model: Any
    spec: SamplingSpec
    text_encoder: Any
    actions: list[str]                  # names of action ids 0..n-1 (empty for text-only models)
    keys: dict[str, str]                # browser key -> action name
    start_frames: torch.Tensor | None   # [N, C, H, W] pixels in [-1, 1], clean first frames (None: generate)
    window: int
    fps: float = 30.0                   # frame-rate cap (0: as fast as the model goes)
    max_sessions: int = 2
    max_frames: int = 0                 # a session's frame limit (0: unbounded)
    codec: Any = None                   # the checkpoint's codec (None: the one spec.codec names)
    prompt: str = ""                    # text models: the prompt a session starts with
    active: set = field(default_factory=set)

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Refuse options no server can run with (a window of 0 would let the KV cache grow without bound)."""
        check_options(window=self.window, fps=self.fps, max_sessions=self.max_sessions, max_frames=self.max_frames,
                      block_size=int(self.spec.block_size or 1))

    @property
    def idle(self) -> int | None:
        """The action when no key is held: "stay" where the model has it, else the null action (None)."""
        return self.actions.index("stay") if "stay" in self.actions else None

    def session(self, seed: int) -> Session:
        return Session(self.model, self.spec, text_encoder=self.text_encoder, codec=self.codec, window=self.window,
                       seed=seed)

    def start_frame(self, seed: int) -> torch.Tensor | None:
        if self.start_frames is None:
            return None
        return self.start_frames[seed % len(self.start_frames)]


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_options(*, window=None, fps=None, max_sessions=None, max_frames=None, block_size: int = 1) -> None:
    """A ConfigError naming the first option (and its CLI flag) outside its allowed values; None: not given.
    User errors name the key at fault (architecture.md §5)."""
    rules = [
        ("window", window, lambda v: _is_int(v) and v >= max(1, block_size),
         f"an integer >= 1 and >= the model's block size ({block_size}): the KV-cache frames"),
        ("fps", fps, lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0,
         "a finite number >= 0 (0: as fast as the model goes)"),
        ("max_sessions", max_sessions, lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
        ("max_frames", max_frames, lambda v: _is_int(v) and v >= 0, "an integer >= 0 (0: no limit)"),
    ]
    for name, value, ok, allowed in rules:
        if value is not None and not ok(value):
            raise ConfigError(f"{name} (--{name.replace('_', '-')}) must be {allowed}; got {value!r}")


def _start_frames(src, spec: SamplingSpec, explicit: bool) -> tuple[dict | None, torch.Tensor | None]:
    """(manifest, frame 0 of each episode as pixels [N, C, H, W] in [-1, 1]) of the recording `src`."""
    from ..data.envs import RecordError, load_episodes

    try:
        ep = load_episodes(src)
    except RecordError as e:
        if explicit:  # asked for explicitly: say why it cannot be used
            raise
        print(f"framecast play: no start frames ({e}); the model draws its own first frame")
        return None, None
    frames = uint8_to_pixels(ep["frames"][:, 0])  # [N, C, H, W] (CPU)
    if tuple(frames.shape[1:]) != tuple(spec.pixel_shape):
        raise SessionError(f"start frames in {src} are {tuple(frames.shape[1:])}; the model makes "
                           f"{tuple(spec.pixel_shape)}")
    return ep["manifest"], frames


def _action_names(num_actions: int, env: str | None) -> tuple[list[str], dict[str, str]]:
    """(action names, browser key -> name) of a model with `num_actions` actions played as `env`."""
    from ..data.envs import ENVS

    if not num_actions:
        return [], {}
    env_spec = ENVS.get(env) if env else None
    if env_spec is not None and len(env_spec.actions) != num_actions:
        raise SessionError(f"the model takes {num_actions} actions; {env!r} has {len(env_spec.actions)}")
    names = list(env_spec.actions) if env_spec else [f"action{i}" for i in range(num_actions)]
    keys = env_spec.key_map if env_spec else {str(i + 1): n for i, n in enumerate(names)}
    return names, keys


def load_world(ckpt: str | Path, *, start: str | Path | None = None, window: int | None = None, env: str | None = None,
               device: str = "cpu", base: str | Path | None = None, prompt: str | None = None,
               size: tuple[int, int] | None = None, preset: str | None = None, **kw) -> World:
    """A World from a model (a framecast checkpoint, or a Wan folder / official .pt on `base`). Action names
    come from the recording it was trained on (its manifest), or from `env`; start frames from the recording
    `start` (frame 0 of each episode), else a shipped model's own start views (pretrained:<name>), else the
    training one. Text models start from `prompt` (default: the
    run's first sample prompt) at `size` (height, width; default the model's)."""
    from .. import pretrained
    from ..data.envs import ENVS
    from ..generate import load

    # the cheap checks before the model loads; World checks the window against the block size again
    check_options(window=window, **{k: kw[k] for k in ("fps", "max_sessions", "max_frames") if k in kw})
    m = load(ckpt, device=device, base=base, preset=preset)
    if size:
        m = m.at_size(*size)
    spec, cfg = m.spec, m.config
    if prompt is None:
        prompt = cfg.sample.prompts[0] if cfg.sample.prompts and not cfg.model.num_actions else ""
    if not spec.causal:
        raise SessionError(f"{ckpt} is a bidirectional model; play needs a causal (AR) student or teacher")
    num_actions = getattr(getattr(m.denoiser, "action_embed", None), "num_actions", 0)
    shipped = pretrained.start_frames(ckpt)  # a shipped world model carries its start views
    src = start or shipped or (cfg.data.path if cfg.data.name == "episodes" else None)
    manifest, frames = _start_frames(src, spec, explicit=bool(start)) if src else (None, None)
    if env is not None and env not in ENVS:
        raise SessionError(f"unknown environment {env!r}; choose one of {sorted(ENVS)}")
    names, keys = _action_names(num_actions, env or (manifest or {}).get("env"))
    win = spec.stream_window(window)
    return World(m.denoiser, spec, m.text_encoder, names, keys, frames, int(win), codec=m.codec, prompt=prompt, **kw)
