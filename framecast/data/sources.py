"""Data sources: `batch(batch_size, generator) -> Batch`, deterministic given the generator.

The trainer seeds one generator per step from (seed, step), so a resumed run draws exactly the batches
the uninterrupted run would have drawn: the data position is the step number.
"""

from __future__ import annotations

import torch

from ..config import DataConfig
from ..models.codecs import Codec
from ..models.conditioning import Cond, TextEncoder
from .batch import Batch
from .shapes import ShapesDataset, collate


class ShapesSource:
    """Text-to-video sprites (data/shapes.py), captions through a frozen text encoder."""

    def __init__(self, cfg: DataConfig, text_encoder: TextEncoder, codec: Codec) -> None:
        self.dataset = ShapesDataset(cfg.num_frames, cfg.height, cfg.width, seed=cfg.seed, length=cfg.length)
        self.text_encoder, self.codec = text_encoder, codec

    def encode_prompts(self, prompts: list[str]) -> tuple[Cond, Cond]:
        return Cond(self.text_encoder.encode(prompts)), Cond(self.text_encoder.encode([""] * len(prompts)))

    def batch(self, batch_size: int, generator: torch.Generator) -> Batch:
        idx = torch.randint(0, len(self.dataset), (batch_size,), generator=generator).tolist()
        video, captions = collate([self.dataset[i] for i in idx])  # [B, F, 3, H, W]
        cond, null = self.encode_prompts(captions)
        return Batch(self.codec.encode(video), cond, null, captions)


def build_source(cfg: DataConfig, text_encoder: TextEncoder, codec: Codec):
    if cfg.name == "shapes":
        return ShapesSource(cfg, text_encoder, codec)
    if cfg.name == "vectors":  # frames are D-vectors: a model with in_channels = D and patch (1, 1, 1)
        from .vectors import VectorMixture, VectorSource

        if (cfg.height, cfg.width) != (1, 1) or codec.latent_channels != cfg.vector_dim:
            raise ValueError(f"vector videos are [B, F, D={cfg.vector_dim}, 1, 1]: set data.height=data.width=1 "
                             f"and model.in_channels=model.out_channels={cfg.vector_dim}, patch_size=[1,1,1]")
        mixture = VectorMixture.random(cfg.num_frames, cfg.vector_dim, cfg.vector_components, cfg.vector_std,
                                       cfg.seed)
        return VectorSource(mixture, text_encoder.dim, cfg.text_tokens)
    raise ValueError(f"unknown data source {cfg.name!r}; choose shapes or vectors")
