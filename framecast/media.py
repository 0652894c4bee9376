"""Writing what users look at: sample videos (gif + mp4), grids, and loss curves (png)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from .errors import DataError
from .models.codecs import pixels_to_uint8, uint8_to_pixels

Tensor = torch.Tensor


def to_uint8(video: Tensor, scale: int = 1) -> np.ndarray:
    """[F, 3, H, W] in [-1, 1] -> [F, H*scale, W*scale, 3] uint8 (nearest upscaling keeps sprites crisp)."""
    if video.ndim != 4 or video.shape[1] != 3:
        raise ValueError(f"expected an RGB video [F, 3, H, W], got {tuple(video.shape)}")
    v = pixels_to_uint8(video).permute(0, 2, 3, 1).cpu().numpy()
    if scale > 1:
        v = v.repeat(scale, axis=1).repeat(scale, axis=2)
    return v


def grid(videos: Tensor, ncol: int | None = None, pad: int = 1) -> Tensor:
    """[N, F, 3, H, W] -> one video [F, 3, H', W'] with the N videos tiled (white 1-px separators)."""
    N, F, C, H, W = videos.shape
    ncol = ncol or math.ceil(math.sqrt(N))
    nrow = math.ceil(N / ncol)
    out = torch.ones(F, C, nrow * (H + pad) + pad, ncol * (W + pad) + pad)
    for i in range(N):
        r, c = divmod(i, ncol)
        y, x = pad + r * (H + pad), pad + c * (W + pad)
        out[:, :, y:y + H, x:x + W] = videos[i].float().cpu()
    return out


def display_scale(height: int, width: int, target: int = 128) -> int:
    """Nearest-neighbour upscaling that makes tiny toy frames visible and leaves real-size frames alone."""
    return max(1, target // max(height, width))


def _fit(img, height: int, width: int):
    """Resize (keeping the aspect ratio) then centre-crop a PIL image to height x width."""
    from PIL import Image

    s = max(height / img.height, width / img.width)
    img = img.resize((max(width, round(img.width * s)), max(height, round(img.height * s))), Image.BICUBIC)
    left, top = (img.width - width) // 2, (img.height - height) // 2
    return img.crop((left, top, left + width, top + height))


def read_image(path: str | Path, height: int, width: int) -> Tensor:
    """An image file as pixels [3, height, width] in [-1, 1] (resized and centre-cropped to fit)."""
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(path).convert("RGB")
    except (OSError, UnidentifiedImageError) as e:
        raise DataError(f"cannot read the image {path} ({e.__class__.__name__})") from None
    arr = torch.from_numpy(np.asarray(_fit(img, height, width)).copy())  # [H, W, 3] uint8
    return uint8_to_pixels(arr.permute(2, 0, 1))


def read_video(path: str | Path, height: int, width: int, max_frames: int | None = None) -> Tensor:
    """A video file as pixels [F, 3, height, width] in [-1, 1], each frame resized and centre-cropped."""
    import imageio.v2 as imageio
    from PIL import Image

    try:
        reader = imageio.get_reader(str(path))
        frames = []
        for f in reader:
            frames.append(np.asarray(_fit(Image.fromarray(f).convert("RGB"), height, width)))
            if max_frames and len(frames) == max_frames:
                break
        reader.close()
    except (OSError, ValueError, RuntimeError) as e:
        raise DataError(f"cannot read the video {path} ({e.__class__.__name__}: {e})".splitlines()[0]) from None
    if not frames:
        raise DataError(f"the video {path} has no frames")
    return uint8_to_pixels(torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2))


def write_video(video: Tensor, path: str | Path, fps: int = 8, scale: int = 4) -> Path:
    """Write [F, 3, H, W] in [-1, 1] as .gif (Pillow) or .mp4 (imageio-ffmpeg's bundled ffmpeg)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frames = to_uint8(video, scale)
    if path.suffix == ".gif":
        from PIL import Image

        imgs = [Image.fromarray(f) for f in frames]
        imgs[0].save(path, save_all=True, append_images=imgs[1:], duration=int(1000 / fps), loop=0)
    elif path.suffix == ".mp4":
        import imageio.v2 as imageio

        # yuv420p needs even sizes; pad by one pixel where necessary
        H, W = frames.shape[1:3]
        frames = np.pad(frames, ((0, 0), (0, H % 2), (0, W % 2), (0, 0)))
        with imageio.get_writer(path, fps=fps, codec="libx264", macro_block_size=1,
                                ffmpeg_log_level="error") as w:
            for f in frames:
                w.append_data(f)
    else:
        raise ValueError(f"unsupported video format {path.suffix!r}; use .gif or .mp4")
    return path


def labelled_rows(rows: list[tuple[str, Tensor]], path: str | Path, fps: int = 6, scale: int = 3,
                  label_width: int = 260) -> Path:
    """One gif/mp4 with a row per (label, clips [N, F, 3, H, W]): the label on the left, the clips tiled."""
    from PIL import Image, ImageDraw

    if not rows:
        raise ValueError("labelled_rows needs at least one row")
    strips = []
    for label, clips in rows:
        tiles = to_uint8(grid(clips, ncol=len(clips)), scale)  # [F, h, w, 3]
        img = Image.new("RGB", (label_width, tiles.shape[1]), "white")
        draw = ImageDraw.Draw(img)
        draw.multiline_text((6, 6), label, fill="black", spacing=3)
        text = np.broadcast_to(np.asarray(img)[None], (tiles.shape[0], *np.asarray(img).shape))
        strips.append(np.concatenate([text, tiles], axis=2))
    width = max(s.shape[2] for s in strips)
    frames = np.concatenate([np.pad(s, ((0, 0), (0, 0), (0, width - s.shape[2]), (0, 0)), constant_values=255)
                             for s in strips], axis=1)  # [F, H_total, W_total, 3]
    video = uint8_to_pixels(torch.from_numpy(frames.copy()).permute(0, 3, 1, 2))
    return write_video(video, path, fps=fps, scale=1)


def plot_metrics(jsonl: str | Path, out: str | Path, keys: tuple[str, ...] = ("loss",)) -> Path | None:
    """Loss curves from a metrics.jsonl; returns None when there is nothing to plot."""
    from .train.loop import read_log

    rows = [r for r in read_log(jsonl) if "step" in r]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3), dpi=110)
    for key in sorted({k for r in rows for k in r if k.endswith(keys)}):
        pts = [(r["step"], r[key]) for r in rows if key in r]
        ax.plot(*zip(*pts), label=key, lw=1.2)
    ax.set_xlabel("step")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return Path(out)
