"""Latent codecs behind one protocol: pixels [B, F, 3, H, W] in [-1, 1] <-> latents [B, F', C, H', W'].

Frames are latent frames everywhere else in framecast (architecture.md §3); pixel <-> latent counts are converted
only here. The toys use the identity codec (the "latent" is the image). The Wan VAE (4x temporal, 8x
spatial, 16 channels, streaming decode) arrives with the Wan loading issue.
"""

from __future__ import annotations

from typing import Protocol

import torch

Tensor = torch.Tensor


class Codec(Protocol):
    latent_channels: int

    def encode(self, pixels: Tensor) -> Tensor: ...

    def decode(self, latents: Tensor) -> Tensor: ...

    def latent_frames(self, pixel_frames: int) -> int: ...


class IdentityCodec:
    """Pixels are the latents; frame counts are equal."""

    def __init__(self, channels: int = 3) -> None:
        self.latent_channels = channels

    def encode(self, pixels: Tensor) -> Tensor:
        if pixels.ndim != 5 or pixels.shape[2] != self.latent_channels:
            raise ValueError(f"expected pixels [B, F, {self.latent_channels}, H, W], got {tuple(pixels.shape)}")
        return pixels

    def decode(self, latents: Tensor) -> Tensor:
        return latents.clamp(-1, 1)

    def latent_frames(self, pixel_frames: int) -> int:
        return pixel_frames

