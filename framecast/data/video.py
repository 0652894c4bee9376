"""Users' video files as fixed-size clips: decode, resample to a frame rate, resize + centre-crop (`framecast
prepare`, data/prepare.py).

    frames = read_video("clips/a.mp4", num_frames=33, height=480, width=832, fps=16)  # uint8 [33, 3, 480, 832]

Decoding goes through imageio-ffmpeg's bundled ffmpeg (mp4, webm, mov, mkv). Output frame k shows time
k / fps and takes the source frame nearest to it, so a 24 fps clip at 16 fps keeps frames 0, 2, 3, 5, ... and
an 8 fps clip repeats each frame; only the frames kept are resized. A frame is scaled, keeping its aspect
ratio, to the smallest size that covers height x width, then centre-cropped.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import DataError

Tensor = torch.Tensor
VIDEO_SUFFIXES = (".mp4", ".webm", ".mov", ".mkv")


class VideoError(DataError):
    """A video file that cannot be decoded or is too short; `why` says what is wrong without the path."""

    def __init__(self, path: str | Path, why: str) -> None:
        super().__init__(f"cannot use the video {path}: {why}")
        self.path, self.why = str(path), why


def source_indices(num_frames: int, src_fps: float, fps: float) -> list[int]:
    """The source frame nearest in time to each output frame k (time k / fps); a tie takes the later frame.
    The epsilon keeps exact ties (24 -> 16 fps: 1.5) from falling either way through rounding error."""
    return [math.floor(k * src_fps / fps + 0.5 + 1e-9) for k in range(num_frames)]


def fit(frames: Tensor, height: int, width: int) -> Tensor:
    """uint8 [n, 3, h, w] -> uint8 [n, 3, height, width]: scaled keeping the aspect ratio to cover, centre-cropped.

    Bilinear with antialiasing, so a downscale averages over the source pixels instead of aliasing."""
    _, _, h, w = frames.shape
    s = max(height / h, width / w)
    nh, nw = max(height, round(h * s)), max(width, round(w * s))
    x = frames.float()  # [n, 3, h, w]
    if (nh, nw) != (h, w):
        x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)  # [n, 3, nh, nw]
    top, left = (nh - height) // 2, (nw - width) // 2
    x = x[:, :, top:top + height, left:left + width]  # [n, 3, height, width]
    return x.round().clamp(0, 255).to(torch.uint8)


def _why(e: BaseException) -> str:
    """One line from an ffmpeg failure: its first line and, when ffmpeg's stderr follows, its last line."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip() and not ln.startswith("===")]
    if not lines:
        return e.__class__.__name__
    return lines[0] if len(lines) == 1 else f"{lines[0]} ({lines[-1]})"


def _meta(meta: dict, path: Path) -> tuple[float, int, int]:
    """(fps, width, height) of the decoded stream, or a VideoError saying which is missing."""
    fps, size = meta.get("fps"), meta.get("size")
    if not isinstance(fps, (int, float)) or not math.isfinite(fps) or fps <= 0:
        raise VideoError(path, f"ffmpeg reports no usable frame rate ({fps!r})")
    if not (isinstance(size, (tuple, list)) and len(size) == 2 and min(size) > 0):
        raise VideoError(path, f"ffmpeg reports no frame size ({size!r})")
    return float(fps), int(size[0]), int(size[1])


def read_video(path: str | Path, num_frames: int, height: int, width: int, fps: float = 16) -> Tensor:
    """The first `num_frames` frames of the video at `fps`, resized and centre-cropped: uint8 [F, 3, H, W].

    A file that cannot be decoded, or holds fewer frames than `num_frames` at `fps` need, is a VideoError
    (a DataError) naming the file and why."""
    import imageio_ffmpeg

    path = Path(path)
    if not path.is_file():
        raise VideoError(path, "no such file")
    kept: dict[int, Tensor] = {}
    decoded = 0
    try:
        reader = imageio_ffmpeg.read_frames(str(path), pix_fmt="rgb24")
        try:
            src_fps, w, h = _meta(next(reader), path)
            want = source_indices(num_frames, src_fps, fps)
            wanted = set(want)
            for raw in reader:
                if len(raw) != w * h * 3:
                    raise VideoError(path, f"frame {decoded} has {len(raw)} bytes, not {w}x{h}x3")
                if decoded in wanted:
                    frame = torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(h, w, 3)  # [h, w, 3]
                    kept[decoded] = fit(frame.permute(2, 0, 1)[None], height, width)[0]  # [3, H, W]
                decoded += 1
                if decoded > want[-1]:
                    break  # the rest of the file is never decoded
        finally:
            reader.close()
    except VideoError:
        raise
    except (OSError, RuntimeError, ValueError, StopIteration) as e:
        raise VideoError(path, f"ffmpeg cannot decode it: {_why(e)}") from None
    if decoded <= want[-1]:
        raise VideoError(path, f"it is too short: {decoded} frames at {src_fps:g} fps ({decoded / src_fps:.2f} s); "
                               f"{num_frames} frames at {fps:g} fps need {want[-1] + 1} "
                               f"({(want[-1] + 1) / src_fps:.2f} s)")
    return torch.stack([kept[j] for j in want])  # [F, 3, H, W]
