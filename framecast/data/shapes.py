"""Moving-sprites toy dataset for text-to-video experiments.

Each sample is a short clip of one coloured sprite sliding across a black frame,
captioned like "a red circle moving left fast". The caption fixes colour, shape,
direction and speed but not the sprite's size or start position, so the
distribution of videos given a caption is multimodal -- a model has to sample,
not regress to a mean. The ground-truth attributes (per-frame centres,
velocities, bounces) are returned with every clip so that evaluation metrics can
be computed exactly rather than estimated by a learned classifier.

Everything is deterministic per (seed, index) and cheap enough to render on the
fly on a small CPU.
"""
from __future__ import annotations

import functools
import operator
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (1.0, 0.15, 0.15),
    "green": (0.15, 0.9, 0.15),
    "blue": (0.2, 0.35, 1.0),
    "yellow": (1.0, 0.9, 0.1),
    "magenta": (1.0, 0.2, 0.9),
    "cyan": (0.1, 0.9, 0.95),
}
SHAPES: tuple[str, ...] = ("square", "circle", "triangle")
# Pixel coordinates: y grows downward, so "up" is negative y.
DIRECTIONS: dict[str, tuple[float, float]] = {
    "left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0),
}
# Fractions of the frame width per frame, so motion looks the same at any resolution.
SPEEDS: dict[str, float] = {"slow": 1 / 32, "fast": 2 / 32}

_CAPTION_FIELDS = ("colour", "shape", "direction", "speed")
_VOCAB = {"colour": tuple(COLOURS), "shape": SHAPES,
          "direction": tuple(DIRECTIONS), "speed": tuple(SPEEDS)}
_SIZE_RANGE = (0.3, 0.42)  # sprite size as a fraction of min(H, W): >= 2 patches of a 4-px patch grid at 32 px
_SUPERSAMPLE = 4


@dataclass(frozen=True, eq=False)  # eq=False: field-wise == is ambiguous on arrays
class SpriteAttrs:
    colour: str
    shape: str
    direction: str
    speed: str
    size: float  # side / diameter / triangle base and height, in pixels
    centres: np.ndarray  # [F, 2] (x, y) per frame, pixel coordinates
    velocities: np.ndarray  # [F, 2] velocity leaving frame f; last row is the final state
    bounces: int

    def __post_init__(self):
        caption_of(self)  # validates the four caption fields
        # Read-only so a cached/shared SpriteAttrs really is immutable.
        self.centres.setflags(write=False)
        self.velocities.setflags(write=False)


@dataclass
class ToySample:
    video: torch.Tensor  # [F, 3, H, W] float32 in [-1, 1]
    caption: str
    attrs: SpriteAttrs


def caption_of(attrs: SpriteAttrs | Mapping[str, str]) -> str:
    get = attrs.get if isinstance(attrs, Mapping) else functools.partial(getattr, attrs)
    words = {}
    for field in _CAPTION_FIELDS:
        word = get(field)
        if word not in _VOCAB[field]:
            raise ValueError(f"unknown {field} {word!r}; expected one of {_VOCAB[field]}")
        words[field] = word
    return "a {colour} {shape} moving {direction} {speed}".format(**words)


def parse_caption(text: str) -> dict[str, str]:
    tokens = text.strip().lower().split()
    template = ("a", "colour", "shape", "moving", "direction", "speed")
    parsed = {}
    # Check slot by slot before the length so the error names the first bad word.
    for slot, token in zip(template, tokens):
        if slot in _VOCAB:
            if token not in _VOCAB[slot]:
                raise ValueError(f"unknown {slot} {token!r} in caption {text!r}")
            parsed[slot] = token
        elif token != slot:
            raise ValueError(f"expected {slot!r} but got {token!r} in caption {text!r}")
    if len(tokens) != len(template):
        raise ValueError(f"caption {text!r} should look like "
                         f"'a <colour> <shape> moving <direction> <speed>'")
    return parsed


def all_captions() -> list[str]:
    return list(_caption_ids())


@functools.lru_cache(maxsize=1)
def _caption_ids() -> dict[str, int]:
    captions = [caption_of(dict(colour=c, shape=s, direction=d, speed=v))
                for c in COLOURS for s in SHAPES for d in DIRECTIONS for v in SPEEDS]
    return {caption: i for i, caption in enumerate(captions)}


def simulate(start: np.ndarray, velocity: np.ndarray, size: float, num_frames: int,
             height: int, width: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Constant-velocity motion with elastic bounces that keep the sprite fully in frame."""
    radius = size / 2
    lo = np.array([radius, radius])
    hi = np.array([width - radius, height - radius])
    pos = np.asarray(start, dtype=np.float64).copy()
    vel = np.asarray(velocity, dtype=np.float64).copy()
    centres, velocities, bounces = [pos.copy()], [vel.copy()], 0
    for _ in range(num_frames - 1):
        pos = pos + vel
        for axis in range(2):
            # A loop, not an if: a fast sprite in a narrow frame can cross both walls.
            while hi[axis] > lo[axis] and not lo[axis] <= pos[axis] <= hi[axis]:
                wall = lo[axis] if pos[axis] < lo[axis] else hi[axis]
                pos[axis] = 2 * wall - pos[axis]
                vel[axis] = -vel[axis]
                bounces += 1
        centres.append(pos.copy())
        velocities.append(vel.copy())
    return np.stack(centres), np.stack(velocities), bounces


def _coverage(shape: str, size: float, centres: np.ndarray, height: int, width: int) -> np.ndarray:
    """Fraction of each pixel covered by the sprite, [F, H, W], via supersampling."""
    ss = _SUPERSAMPLE
    xs = (np.arange(width * ss) + 0.5) / ss  # sub-sample centres; pixel j spans [j, j+1)
    ys = (np.arange(height * ss) + 0.5) / ss
    dx = xs[None, None, :] - centres[:, 0, None, None]
    dy = ys[None, :, None] - centres[:, 1, None, None]
    half = size / 2
    if shape == "square":
        inside = (np.abs(dx) <= half) & (np.abs(dy) <= half)
    elif shape == "circle":
        inside = dx**2 + dy**2 <= half**2
    elif shape == "triangle":
        depth = dy + half  # distance below the apex; the width grows linearly with it
        inside = (depth >= 0) & (depth <= size) & (np.abs(dx) <= depth / 2)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    return inside.reshape(len(centres), height, ss, width, ss).mean(axis=(2, 4))


def render(attrs: SpriteAttrs, height: int, width: int) -> torch.Tensor:
    coverage = _coverage(attrs.shape, attrs.size, attrs.centres, height, width)
    rgb = np.asarray(COLOURS[attrs.colour], dtype=np.float64)
    video = coverage[:, None] * rgb[None, :, None, None] * 2 - 1
    return torch.from_numpy(video.astype(np.float32))


def collate(samples: list[ToySample]) -> tuple[torch.Tensor, list[str]]:
    return torch.stack([s.video for s in samples]), [s.caption for s in samples]


class ShapesDataset(torch.utils.data.Dataset):
    def __init__(self, num_frames: int, height: int, width: int, *, seed: int = 0,
                 length: int = 100_000):
        for name, value, minimum in (("num_frames", num_frames, 1), ("height", height, 8),
                                     ("width", width, 8), ("seed", seed, 0), ("length", length, 1)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
                raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
        self.num_frames, self.height, self.width = int(num_frames), int(height), int(width)
        self.seed, self.length = int(seed), int(length)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> ToySample:
        return self._sample(self.sample_attrs(index))

    def sample_attrs(self, index: int) -> SpriteAttrs:
        index = operator.index(index)
        if not -self.length <= index < self.length:
            raise IndexError(f"index {index} out of range for ShapesDataset of length {self.length}")
        index %= self.length
        rng = np.random.default_rng([self.seed, index])
        words = {field: vocab[rng.integers(len(vocab))] for field, vocab in _VOCAB.items()}
        return self._nuisance(rng, words)

    def sample_for_caption(self, caption: str, index: int) -> ToySample:
        words = parse_caption(caption)
        index = operator.index(index)
        if index < 0:
            raise ValueError(f"index must be >= 0, got {index}")
        # 1 + id keeps this stream disjoint from __getitem__'s [seed, index] stream
        # (SeedSequence treats a trailing 0 like a missing entry).
        rng = np.random.default_rng([self.seed, index, 1 + _caption_ids()[caption_of(words)]])
        return self._sample(self._nuisance(rng, words))

    def _nuisance(self, rng: np.random.Generator, words: dict[str, str]) -> SpriteAttrs:
        """Draw what the caption does not say: size and start position."""
        size = float(rng.uniform(*_SIZE_RANGE) * min(self.height, self.width))
        radius = size / 2
        start = np.array([rng.uniform(radius, self.width - radius),
                          rng.uniform(radius, self.height - radius)])
        velocity = np.array(DIRECTIONS[words["direction"]]) * SPEEDS[words["speed"]] * self.width
        centres, velocities, bounces = simulate(start, velocity, size, self.num_frames,
                                                self.height, self.width)
        return SpriteAttrs(**words, size=size, centres=centres, velocities=velocities,
                           bounces=bounces)

    def _sample(self, attrs: SpriteAttrs) -> ToySample:
        return ToySample(render(attrs, self.height, self.width), caption_of(attrs), attrs)
