"""Data sources: `batch(batch_size, generator) -> Batch`, deterministic given the generator.

The trainer seeds one generator per step from (seed, step), so a resumed run draws exactly the batches
the uninterrupted run would have drawn: the data position is the step number.
"""

from __future__ import annotations

import torch

from .. import rng
from ..config import DataConfig
from ..errors import ConfigError
from ..models.codecs import Codec, uint8_to_pixels
from ..models.conditioning import Cond, TextEncoder
from .batch import Batch
from .shapes import ShapesDataset, collate


class _Prompted:
    """Sources whose periodic training samples are conditioned on prompts through the run's text encoder."""

    text_encoder: TextEncoder

    def encode_prompts(self, prompts: list[str]) -> tuple[Cond, Cond]:
        return Cond(self.text_encoder.encode(prompts)), Cond(self.text_encoder.encode([""] * len(prompts)))


class ShapesSource(_Prompted):
    """Text-to-video sprites (data/shapes.py), captions through a frozen text encoder."""

    def __init__(self, cfg: DataConfig, text_encoder: TextEncoder, codec: Codec) -> None:
        self.dataset = ShapesDataset(cfg.num_frames, cfg.height, cfg.width, seed=cfg.seed, length=cfg.length)
        self.text_encoder, self.codec = text_encoder, codec

    def batch(self, batch_size: int, generator: torch.Generator) -> Batch:
        idx = rng.randint(0, len(self.dataset), (batch_size,), generator).tolist()
        video, captions = collate([self.dataset[i] for i in idx])  # [B, F, 3, H, W]
        cond, null = self.encode_prompts(captions)
        return Batch(self.codec.encode(video), cond, null, captions)


class EpisodeSource(_Prompted):
    """Clips of recorded episodes (data/envs.py) for action-conditioned world models: `num_frames` consecutive
    frames from a random episode and start, their actions (actions[:, f] leads to frame f) and the empty prompt.
    The null conditioning has null actions, so conditioning dropout trains the action-unconditional model."""

    def __init__(self, cfg: DataConfig, text_encoder: TextEncoder, codec: Codec, num_actions: int) -> None:
        from .envs import load_episodes

        if not cfg.path:
            raise ConfigError("data.name=episodes needs data.path (a folder written by framecast record)")
        ep = load_episodes(cfg.path)
        self.frames, self.actions = ep["frames"], ep["actions"]  # [E, T, 3, H, W] uint8, [E, T]
        E, T, C, H, W = self.frames.shape
        if (H, W) != (cfg.height, cfg.width) or T < cfg.num_frames:
            raise ConfigError(f"{cfg.path} holds {T}-frame episodes of {H}x{W}; the config asks for "
                             f"{cfg.num_frames} frames of {cfg.height}x{cfg.width}")
        null = int(ep["manifest"]["null_action"])  # = the number of actions; frame 0 of every episode has it
        if null != num_actions:
            raise ConfigError(f"{cfg.path} records {null} actions; set model.num_actions={null}")
        self.num_frames, self.null_action = cfg.num_frames, null
        self.text_encoder, self.codec = text_encoder, codec

    def batch(self, batch_size: int, generator: torch.Generator) -> Batch:
        E, T = self.actions.shape
        ep = rng.randint(0, E, (batch_size,), generator)
        start = rng.randint(0, T - self.num_frames + 1, (batch_size,), generator)
        idx = start[:, None] + torch.arange(self.num_frames)  # [B, F]
        video = uint8_to_pixels(self.frames[ep[:, None], idx])  # [B, F, 3, H, W] in [-1, 1]
        actions = self.actions[ep[:, None], idx]  # [B, F]
        text = self.text_encoder.encode([""] * batch_size)
        null = Cond(text.clone(), torch.full_like(actions, self.null_action))  # own storage: pair stores save both
        return Batch(self.codec.encode(video), Cond(text, actions), null, [""] * batch_size)


def build_source(cfg: DataConfig, text_encoder: TextEncoder, codec: Codec, num_actions: int = 0):
    if cfg.name == "shapes":
        return ShapesSource(cfg, text_encoder, codec)
    if cfg.name == "vectors":  # frames are D-vectors: a model with in_channels = D and patch (1, 1, 1)
        from .vectors import VectorMixture, VectorSource

        if (cfg.height, cfg.width) != (1, 1) or codec.latent_channels != cfg.vector_dim:
            raise ConfigError(f"vector videos are [B, F, D={cfg.vector_dim}, 1, 1]: set data.height=data.width=1 "
                             f"and model.in_channels=model.out_channels={cfg.vector_dim}, patch_size=[1,1,1]")
        mixture = VectorMixture.random(cfg.num_frames, cfg.vector_dim, cfg.vector_components, cfg.vector_std,
                                       cfg.seed)
        return VectorSource(mixture, text_encoder.dim, cfg.text_tokens)
    if cfg.name == "episodes":
        return EpisodeSource(cfg, text_encoder, codec, num_actions)
    if cfg.name == "store":  # written by `framecast prepare` (data/prepare.py): latents, prompts, captions
        from .store import StoreSource

        return StoreSource(cfg, text_encoder, codec)
    raise ConfigError(f"unknown data source {cfg.name!r}; choose shapes, vectors, episodes or store")
