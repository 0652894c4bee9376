"""Latent codecs behind one protocol: pixels [B, F, 3, H, W] in [-1, 1] <-> latents [B, F', C, H', W'].

Frames are latent frames everywhere else in framecast (architecture.md §3); pixel <-> latent counts and
shapes are converted only here. A codec is named in the model config (`model.codec`) and in every
checkpoint's sampling spec; data sources encode through it and every output path decodes through it once
(`generate.LoadedModel.decode`, `stream.Session`). Causal codecs decode a stream latent frame by latent
frame through a `StreamDecoder`, which keeps whatever state the codec needs between calls (the Wan VAE's
causal-convolution cache, for example); the identity codec needs none.

The toys use the identity codec: the "latent" is the image, so frame counts and shapes are equal. The Wan2.1
VAE (`wan_vae`, models/wan_vae.py) is built from `model.codec_source`; importing this module stays light
(diffusers is imported only when a Wan VAE is built).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import torch

from ..errors import ConfigError

Tensor = torch.Tensor


class StreamDecoder(Protocol):
    def step(self, latents: Tensor) -> Tensor:
        """The pixel frames [B, f, C, H, W] of the next latent frames [B, k, C', H', W'] of one stream."""
        ...


class Codec(Protocol):
    name: str
    latent_channels: int
    pixel_channels: int

    def encode(self, pixels: Tensor) -> Tensor: ...

    def decode(self, latents: Tensor) -> Tensor: ...

    def decoder(self) -> StreamDecoder: ...

    def latent_frames(self, pixel_frames: int) -> int: ...

    def pixel_frames(self, latent_frames: int) -> int: ...

    def latent_shape(self, pixel_shape: tuple[int, int, int]) -> tuple[int, int, int]: ...


class _Stateless:
    """A stream decoder for codecs whose decode of a frame does not depend on earlier frames."""

    def __init__(self, decode: Callable[[Tensor], Tensor]) -> None:
        self._decode = decode

    def step(self, latents: Tensor) -> Tensor:
        return self._decode(latents)


class IdentityCodec:
    """Pixels are the latents; frame counts and shapes are equal. Decoding clamps to the pixel range."""

    name = "identity"

    def __init__(self, channels: int = 3) -> None:
        self.latent_channels = self.pixel_channels = channels

    def encode(self, pixels: Tensor) -> Tensor:
        if pixels.ndim != 5 or pixels.shape[2] != self.latent_channels:
            raise ValueError(f"expected pixels [B, F, {self.latent_channels}, H, W], got {tuple(pixels.shape)}")
        return pixels

    def decode(self, latents: Tensor) -> Tensor:
        return latents.clamp(-1, 1)

    def decoder(self) -> StreamDecoder:
        return _Stateless(self.decode)

    def latent_frames(self, pixel_frames: int) -> int:
        return pixel_frames

    def pixel_frames(self, latent_frames: int) -> int:
        return latent_frames

    def latent_shape(self, pixel_shape: tuple[int, int, int]) -> tuple[int, int, int]:
        return tuple(pixel_shape)  # type: ignore[return-value]


def uint8_to_pixels(frames: Tensor) -> Tensor:
    """Stored frames (uint8 0..255, any shape) -> pixels in [-1, 1]: the one conversion of recorded frames."""
    return frames.float() / 127.5 - 1


def pixels_to_uint8(pixels: Tensor) -> Tensor:
    """Pixels in [-1, 1] (clamped) -> uint8 0..255, rounded: the one conversion for files and the browser."""
    return ((pixels.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def _identity(latent_channels: int, source: str | Path | None = None, device: str = "cpu") -> Codec:
    return IdentityCodec(latent_channels)  # nothing to load or place: `source` and `device` are ignored


def _wan_vae(latent_channels: int, source: str | Path | None = None, device: str = "cpu") -> Codec:
    """The Wan2.1 VAE (models/wan_vae.py, which imports diffusers only here) from `source`."""
    if not source:
        raise ConfigError("codec 'wan_vae' needs its weights: set model.codec_source to a diffusers vae/ folder, a "
                          "diffusers root holding vae/, or an original Wan2.1_VAE.pth")
    from .wan_vae import load_wan_vae

    codec = load_wan_vae(source, device=device)
    if codec.latent_channels != latent_channels:
        raise ConfigError(f"model.in_channels is {latent_channels} but the Wan VAE at {source} makes "
                          f"{codec.latent_channels} latent channels (its z_dim)")
    return codec


# name -> builder(latent_channels, source=None, device="cpu"); `source` names the codec's weights (model.codec_source)
CODECS: dict[str, Callable[..., Codec]] = {"identity": _identity, "wan_vae": _wan_vae}


def shape_codec(name: str, latent_channels: int, source: str | Path | None = None) -> Codec:
    """The codec `name` for its frame-count and shape arithmetic only (`latent_frames`, `latent_shape`): no weights
    are read, so it needs no files (the memory planner, plan.py). The Wan VAE is built on the meta device from its
    config (a diffusers folder's config.json when `source` holds one, else the Wan2.1 VAE's)."""
    if name != "wan_vae":
        return build_codec(name, latent_channels)
    from .wan_vae import WanVAECodec, build_vae, vae_config

    codec = WanVAECodec(build_vae(vae_config(_vae_config_file(source)), meta=True))
    if codec.latent_channels != latent_channels:
        raise ConfigError(f"model.in_channels is {latent_channels} but the Wan VAE makes {codec.latent_channels} "
                          f"latent channels (its z_dim)")
    return codec


def _vae_config_file(source: str | Path | None) -> Path | None:
    """The AutoencoderKLWan config.json of a diffusers vae/ folder or root, if `source` is one (an original Wan
    root's config.json is the DiT's and is not used); None otherwise, also for a path that does not exist."""
    for f in (Path(source) / "vae" / "config.json", Path(source) / "config.json") if source else ():
        if f.is_file():
            try:
                data = json.loads(f.read_text())
            except (OSError, ValueError) as e:
                raise ConfigError(f"{f} is not a readable JSON config ({e.__class__.__name__})") from None
            return f if isinstance(data, dict) and data.get("_class_name") == "AutoencoderKLWan" else None
    return None


def build_codec(name: str, latent_channels: int, source: str | Path | None = None, *,
                device: str = "cpu") -> Codec:
    """The codec `name` for `latent_channels` latent channels; `source` (a path; "" = none) holds its weights;
    `device`: where it encodes and decodes (`framecast prepare` encodes on train.device)."""
    if name not in CODECS:
        raise ConfigError(f"unknown codec {name!r} (model.codec); choose one of {sorted(CODECS)}")
    if not source:  # builders that need no weights may take latent_channels alone
        return CODECS[name](latent_channels)
    return CODECS[name](latent_channels, source, device=device)
