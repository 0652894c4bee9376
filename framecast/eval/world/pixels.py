"""Pixel metrics of frames in [-1, 1]: PSNR and SSIM per frame, and recorded uint8 frames as video
(docs/world_model.md, metrics)."""

from __future__ import annotations

import torch
from torch import nn

from ...models.codecs import uint8_to_pixels

Tensor = torch.Tensor


def to_video(frames_uint8: Tensor) -> Tensor:
    """Recorded frames (uint8, any shape) -> float frames in [-1, 1]."""
    return uint8_to_pixels(frames_uint8)


def psnr(pred: Tensor, target: Tensor) -> Tensor:
    """PSNR in dB per frame for frames in [-1, 1] (peak-to-peak 2): [..., C, H, W] -> [...]."""
    if pred.shape != target.shape:
        raise ValueError(f"psnr of {tuple(pred.shape)} vs {tuple(target.shape)}")
    mse = ((pred.float() - target.float()) ** 2).flatten(-3).mean(-1)
    return 10 * torch.log10(4.0 / mse.clamp_min(1e-10))


def _gaussian(window: int, sigma: float, channels: int) -> Tensor:
    """A normalised 2-D Gaussian as a depthwise conv kernel [C, 1, k, k]."""
    r = torch.arange(window, dtype=torch.float32) - (window - 1) / 2
    g1 = torch.exp(-r**2 / (2 * sigma**2))
    g1 = g1 / g1.sum()
    return (g1[:, None] * g1[None, :]).expand(channels, 1, window, window)


def ssim(pred: Tensor, target: Tensor, *, window: int = 11, sigma: float = 1.5) -> Tensor:
    """SSIM per frame (Wang et al. 2004: Gaussian window, K1 0.01, K2 0.03, valid positions only, mean over
    channels) for frames in [-1, 1]: [..., C, H, W] -> [...]. The window shrinks (odd) for frames under 11 px."""
    if pred.shape != target.shape:
        raise ValueError(f"ssim of {tuple(pred.shape)} vs {tuple(target.shape)}")
    lead, (C, H, W) = pred.shape[:-3], pred.shape[-3:]
    window = min(window, H, W)
    window -= 1 - window % 2  # odd, so the window has a centre
    x = pred.float().reshape(-1, C, H, W)
    y = target.float().reshape(-1, C, H, W)
    kernel = _gaussian(window, sigma, C)

    def blur(t: Tensor) -> Tensor:
        return nn.functional.conv2d(t, kernel, groups=C)  # [N, C, H-k+1, W-k+1]

    c1, c2 = (0.01 * 2) ** 2, (0.03 * 2) ** 2  # data range 2 for [-1, 1]
    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return s.flatten(1).mean(1).reshape(lead)
