"""Video metrics for the sprites toy, computed from its known generative process (data/shapes.py).

The toy's process is simple enough to invert: every real frame is one palette colour times an anti-aliased
coverage map of a square, circle or triangle on black, and every real clip moves that sprite at a constant
axis-aligned velocity with elastic bounces. So instead of VBench's learned detectors, each frame is *fitted*
with the best sprite (colour, shape, size, centre) and the metrics read the fits -- in the spirit of VBench's
dimensions (Huang et al. 2024), but exact on real data:

| metric | what it asks | real | blurred | frozen | noise | its own failure |
|---|---|---|---|---|---|---|
| fidelity | is each frame one sharp on-palette sprite? (1 - rel. L1 error of the fit) | ~1 | 0.62 | ~1 | 0.04 | blur |
| subject consistency | do sprites keep colour, shape and size over the clip? | ~1 | ~1 | ~1 | 0 | identity swap |
| dynamic degree | does the object travel at least half the captioned speed? | ~1 | ~1 | 0 | 0 | frozen |
| motion smoothness | is each frame triple constant-velocity, or one elastic bounce? | ~1 | ~1 | ~1 | 0 | shuffled frames |
| instruction following | do colour, shape, direction and speed match the caption? | ~1 | ~1 | 0.5 | 0 | wrong captions |
| Frechet distance | distance of encoder features to real clips (lower is better) | floor | x3 | x30 | x70 | all |

Each metric targets the failures it is named after and is blind to the others on purpose, as in VBench (a
frozen clip of sharp frames has perfect per-frame fidelity; a blurred clip still moves): a failure shows up
as a drop in the metric that names it, not as a vague drop everywhere. The Frechet distance sees them all.
The object-level metrics (consistency, dynamics, smoothness, colour/shape following) count a frame only when
its fit explains at least a quarter of it (relative error below `RECOGNISED`) with a sprite of the toy's size
range, like a detector-based metric: noise, a blank frame or a colour wash holds no object.
Tests: tests/test_eval_toy.py checks every cell of the table above.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..data.shapes import _SIZE_RANGE, COLOURS, DIRECTIONS, SHAPES, SPEEDS, ShapesDataset, _coverage, parse_caption

Tensor = torch.Tensor

RECOGNISED = 0.75  # a frame holds an object when one sprite fit explains at least a quarter of it (error < 0.75)
_MIN_AREA = 4.0  # coverage mass in pixels below which a frame is empty (real sprites cover >= ~45 px at 32x32)
_AREA = {"square": 1.0, "circle": math.pi / 4, "triangle": 0.5}  # area / size^2 of each shape
_PALETTE = np.array([COLOURS[c] for c in COLOURS])  # [K, 3]
_COLOUR_NAMES = tuple(COLOURS)


@dataclass
class FrameFits:
    """Per-frame sprite fits of a batch of clips; arrays are [B, F] (centre [B, F, 2])."""

    colour: np.ndarray  # int index into COLOURS
    shape: np.ndarray  # int index into SHAPES
    size: np.ndarray  # pixels
    centre: np.ndarray  # (x, y) pixel coordinates of the bounding-box centre (data/shapes.py convention)
    mass_centre: np.ndarray  # coverage-weighted centroid, defined for any frame (frame centre if empty)
    error: np.ndarray  # relative L1 error of the best fit, 1 for an empty frame
    height: int
    width: int

    @property
    def recognised(self) -> np.ndarray:
        return self.error < RECOGNISED


def _check_video(video: Tensor) -> np.ndarray:
    if not isinstance(video, torch.Tensor) or video.ndim != 5 or video.shape[2] != 3:
        raise ValueError(f"toy metrics take RGB clips [B, F, 3, H, W] in [-1, 1], got "
                         f"{tuple(video.shape) if isinstance(video, torch.Tensor) else type(video).__name__}")
    return ((video.detach().float().cpu().numpy() + 1) / 2).clip(0, 1)  # [B, F, 3, H, W] in [0, 1]


def fit_frames(video: Tensor) -> FrameFits:
    """Fit one sprite to every frame: palette colour by least squares on the colour ray, coverage by projection,
    size from the covered area (clipped to the toy's size range) and centre from the centroid, then the shape
    whose render explains the frame best."""
    x = _check_video(video)
    B, F, _, H, W = x.shape
    px = x.reshape(B * F, 3, H * W)  # [N, 3, P]
    pal = _PALETTE  # [K, 3]
    # coverage along each colour ray, clipped to the renderable range [0, 1]: [N, K, P]
    cov = np.clip(np.einsum("kc,ncp->nkp", pal, px) / (pal**2).sum(1)[None, :, None], 0, 1)
    resid = ((px[:, None] - cov[:, :, None] * pal[None, :, :, None]) ** 2).sum((2, 3))  # [N, K]
    colour = resid.argmin(1)
    c = cov[np.arange(B * F), colour]  # [N, P]
    mass = c.sum(1)
    ys, xs = np.divmod(np.arange(H * W), W)
    safe = np.maximum(mass, 1e-8)
    centroid = np.stack([(c * (xs + 0.5)).sum(1) / safe, (c * (ys + 0.5)).sum(1) / safe], 1)  # [N, 2]
    empty = mass < _MIN_AREA
    centroid[empty] = (W / 2, H / 2)
    best_err = np.ones(B * F)
    best_shape = np.zeros(B * F, dtype=int)
    best_size = np.zeros(B * F)
    best_centre = centroid.copy()
    lo, hi = (r * min(H, W) for r in _SIZE_RANGE)
    for n in np.flatnonzero(~empty):
        target = px[n].reshape(3, H, W)
        norm = np.abs(target).sum()
        rgb = pal[colour[n]][:, None, None]
        for s, shape in enumerate(SHAPES):
            # sizes outside the process's range are not sprites of this toy: a frame washed with one colour
            # must not pass as a frame-sized square, so the fit is clipped to the range (real fits are exact)
            size = min(max(math.sqrt(mass[n] / _AREA[shape]), lo), hi)
            centre = centroid[n].copy()
            if shape == "triangle":  # apex up: the centroid sits size/6 below the bounding-box centre
                centre[1] -= size / 6
            fit = _coverage(shape, size, centre[None], H, W)[0] * rgb  # [3, H, W]
            err = np.abs(target - fit).sum() / max(norm, 1e-8)
            if err < best_err[n]:
                best_err[n], best_shape[n], best_size[n], best_centre[n] = err, s, size, centre
    r = lambda a: a.reshape(B, F, *a.shape[1:])  # noqa: E731
    return FrameFits(r(colour), r(best_shape), r(best_size), r(best_centre), r(centroid), r(np.minimum(best_err, 1.0)),
                     H, W)


def _modal(a: np.ndarray, keep: np.ndarray) -> int:
    vals = a[keep]
    return int(np.bincount(vals).argmax()) if vals.size else -1


def fidelity(f: FrameFits) -> np.ndarray:
    """[B]: mean over frames of 1 - relative L1 error of the best single-sprite fit."""
    return (1 - f.error).mean(1)


def subject_consistency(f: FrameFits, size_tol: float = 0.15) -> np.ndarray:
    """[B]: fraction of frames that are recognised and keep the clip's modal colour, modal shape and median
    size within `size_tol` (relative)."""
    out = np.zeros(f.error.shape[0])
    for b in range(len(out)):
        keep = f.recognised[b]
        if not keep.any():
            continue
        same = (keep & (f.colour[b] == _modal(f.colour[b], keep)) & (f.shape[b] == _modal(f.shape[b], keep))
                & (np.abs(f.size[b] - np.median(f.size[b][keep])) <= size_tol * np.median(f.size[b][keep])))
        out[b] = same.mean()
    return out


def _speeds_px(width: int) -> dict[str, float]:
    return {k: v * width for k, v in SPEEDS.items()}


def dynamic_degree(f: FrameFits, captions: list[str] | None = None, fraction: float = 0.5) -> np.ndarray:
    """[B] in {0, 1}: does the object move at least `fraction` of the captioned speed (the slow speed without
    captions), as a mean over the transitions whose two frames hold an object? Clips with objects in fewer
    than half their transitions count as not dynamic: a colour wash spreading over the frame moves its mass
    centroid but is not an object moving. Blur does not matter here (fidelity's business)."""
    B, F = f.error.shape
    step = np.linalg.norm(np.diff(f.centre, axis=1), axis=2)  # [B, F-1]
    both = f.recognised[:, 1:] & f.recognised[:, :-1]
    mean_step = (step * both).sum(1) / np.maximum(both.sum(1), 1)
    speeds = _speeds_px(f.width)
    want = np.array([speeds[parse_caption(c)["speed"]] if captions else min(speeds.values())
                     for c in (captions or [None] * B)])
    return ((mean_step >= fraction * want) & (both.sum(1) >= (F - 1) / 2)).astype(float)


def motion_smoothness(f: FrameFits, tol: float = 1.0) -> np.ndarray:
    """[B]: fraction of frame triples (f-1, f, f+1), all recognised, whose centres follow constant velocity
    (|c[f-1] - 2 c[f] + c[f+1]| <= tol px per axis) or one elastic bounce off a wall of the fitted sprite
    (the same with c[f-1] or c[f+1] mirrored about that wall)."""
    B, F = f.error.shape
    if F < 3:
        raise ValueError(f"motion smoothness needs clips of >= 3 frames, got {F}")
    out = np.zeros(B)
    limits = np.array([f.width, f.height], dtype=float)
    for b in range(B):
        ok = 0
        for t in range(1, F - 1):
            if not f.recognised[b, t - 1:t + 2].all():
                continue
            p, q, r = f.centre[b, t - 1], f.centre[b, t], f.centre[b, t + 1]
            half = f.size[b, t] / 2
            smooth = True
            for ax in range(2):
                cands = [p[ax] - 2 * q[ax] + r[ax]]
                for wall in (half, limits[ax] - half):
                    cands += [2 * wall - p[ax] - 2 * q[ax] + r[ax], p[ax] - 2 * q[ax] + 2 * wall - r[ax]]
                smooth &= min(abs(c) for c in cands) <= tol
            ok += smooth
        out[b] = ok / (F - 2)
    return out


def _direction_of(d: np.ndarray) -> str | None:
    ax = int(np.abs(d).argmax())
    if ax == 0:
        return "right" if d[0] > 0 else "left"
    return "down" if d[1] > 0 else "up"


def instruction_following(f: FrameFits, captions: list[str]) -> dict[str, np.ndarray]:
    """Per clip, whether colour, shape (modal over recognised frames), direction (first displacement, or its
    mirror about the captioned wall when the clip starts with a bounce) and speed (median displacement, the
    nearer of the two toy speeds, none below half the slow one) match the caption; `all` is their mean."""
    B, F = f.error.shape
    if len(captions) != B:
        raise ValueError(f"{len(captions)} captions for {B} clips")
    speeds = _speeds_px(f.width)
    limits = np.array([f.width, f.height], dtype=float)
    res = {k: np.zeros(B) for k in ("colour", "shape", "direction", "speed")}
    for b, cap in enumerate(captions):
        want = parse_caption(cap)
        keep = f.recognised[b]
        res["colour"][b] = _modal(f.colour[b], keep) == _COLOUR_NAMES.index(want["colour"])
        res["shape"][b] = _modal(f.shape[b], keep) == SHAPES.index(want["shape"])
        c = f.centre[b]
        step = np.linalg.norm(np.diff(c, axis=0), axis=1)  # [F-1]
        speed = float(np.median(step))
        if speed >= 0.5 * min(speeds.values()):
            res["speed"][b] = min(speeds, key=lambda k: abs(speeds[k] - speed)) == want["speed"]
            d = c[1] - c[0]
            ax = int(np.nonzero(DIRECTIONS[want["direction"]])[0][0])
            wall = f.size[b, 1] / 2 if DIRECTIONS[want["direction"]][ax] < 0 else limits[ax] - f.size[b, 1] / 2
            mirrored = d.copy()
            mirrored[ax] = 2 * wall - c[1, ax] - c[0, ax]
            res["direction"][b] = want["direction"] in (_direction_of(d), _direction_of(mirrored))
    res["all"] = np.mean([res[k] for k in ("colour", "shape", "direction", "speed")], axis=0)
    return res


def speed_ratio(f: FrameFits, captions: list[str]) -> np.ndarray:
    """[B]: median displacement per frame along the captioned axis over the captioned speed (real clips: 1; a
    bounce shortens one step, which the median ignores). A diagnostic, not a [0, 1] score: 0.5 means the object
    moves at half the speed it was asked for, whatever its direction."""
    if len(captions) != f.error.shape[0]:
        raise ValueError(f"{len(captions)} captions for {f.error.shape[0]} clips")
    speeds = _speeds_px(f.width)
    out = np.zeros(len(captions))
    for b, cap in enumerate(captions):
        want = parse_caption(cap)
        ax = int(np.nonzero(DIRECTIONS[want["direction"]])[0][0])
        out[b] = np.median(np.abs(np.diff(f.centre[b, :, ax]))) / speeds[want["speed"]]
    return out


def clip_scores(video: Tensor | FrameFits, captions: list[str]) -> dict[str, np.ndarray]:
    """Every metric above per clip ([B] arrays in [0, 1], higher is better), for means and standard errors. Takes
    the clips, or their fits when the caller reads them too (the fit is the costly part)."""
    f = video if isinstance(video, FrameFits) else fit_frames(video)
    follow = instruction_following(f, captions)
    return {"fidelity": fidelity(f),
            "recognised": f.recognised.mean(1),
            "subject_consistency": subject_consistency(f),
            "dynamic_degree": dynamic_degree(f, captions),
            "motion_smoothness": motion_smoothness(f),
            "instruction_following": follow["all"],
            **{f"follow_{k}": v for k, v in follow.items() if k != "all"}}


def clip_metrics(video: Tensor, captions: list[str]) -> dict[str, float]:
    """Means over the clips of every per-clip metric above (all in [0, 1], higher is better)."""
    return {k: float(v.mean()) for k, v in clip_scores(video, captions).items()}


def standard_error(a: np.ndarray) -> float:
    """Standard error of the mean of per-clip scores (sample standard deviation / sqrt(n)); nan below 2 clips."""
    a = np.asarray(a, dtype=float)
    return float(a.std(ddof=1) / math.sqrt(a.size)) if a.size > 1 else float("nan")


# ---------------------------------------------------------------------------------------------------------
# Corruptions the metrics are tested against (and the health check compares to)


def blur(video: Tensor, sigma: float = 1.5) -> Tensor:
    """Gaussian blur of every frame (separable, reflect padding), in [-1, 1]."""
    radius = max(1, int(math.ceil(3 * sigma)))
    k = torch.exp(-0.5 * (torch.arange(-radius, radius + 1, dtype=torch.float32) / sigma) ** 2)
    k = k / k.sum()
    B, F, C, H, W = video.shape
    x = (video.reshape(B * F * C, 1, H, W) + 1) / 2
    x = torch.nn.functional.pad(x, (radius, radius, radius, radius), mode="reflect")
    x = torch.nn.functional.conv2d(x, k.view(1, 1, 1, -1))
    x = torch.nn.functional.conv2d(x, k.view(1, 1, -1, 1))
    return (x * 2 - 1).reshape(B, F, C, H, W)


def freeze(video: Tensor) -> Tensor:
    """Every frame replaced by the first: sharp, on-palette and perfectly still."""
    return video[:, :1].expand_as(video).clone()


def noise(video: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Uniform noise in [-1, 1] ("TV static")."""
    return torch.rand(video.shape, generator=generator) * 2 - 1


def real_clips(n: int, num_frames: int, height: int, width: int, seed: int) -> tuple[Tensor, list[str]]:
    """`n` real toy clips [n, F, 3, H, W] and captions from an evaluation seed (keep it apart from the
    training seed so evaluation captions and nuisances are held out)."""
    ds = ShapesDataset(num_frames, height, width, seed=seed)
    samples = [ds[i] for i in range(n)]
    return torch.stack([s.video for s in samples]), [s.caption for s in samples]
