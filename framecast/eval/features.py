"""Frechet distance for toy clips on features of a small video encoder trained only on real toy data.

FVD uses an I3D network trained on Kinetics; neither exists here, and a generic network would not know what
matters in a sprite clip. So the encoder is a three-layer 3D conv net trained to read the caption's four
attributes (colour, shape, direction, speed) from real clips of the toy. Its penultimate features then
encode appearance *and* motion, and the Frechet distance between feature Gaussians (Heusel et al. 2017,
eq. 6: |mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^1/2)) is low for real-vs-real and grows for blurred,
frozen or noisy clips (tests/test_eval_toy.py). The encoder is deterministic per seed and cached on disk.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..data.shapes import COLOURS, DIRECTIONS, SHAPES, SPEEDS, ShapesDataset, parse_caption

Tensor = torch.Tensor
_HEADS = {"colour": tuple(COLOURS), "shape": SHAPES, "direction": tuple(DIRECTIONS), "speed": tuple(SPEEDS)}


class ToyVideoEncoder(nn.Module):
    """[B, F, 3, H, W] in [-1, 1] -> [B, dim] features; heads read the caption attributes (training only)."""

    def __init__(self, dim: int = 32, width: int = 24) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv3d(6, width, 3, stride=(1, 2, 2), padding=1), nn.GELU(),
            nn.Conv3d(width, 2 * width, 3, stride=(1, 2, 2), padding=1), nn.GELU(),
            nn.Conv3d(2 * width, 2 * width, 3, stride=(2, 2, 2), padding=1), nn.GELU(),
            nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(2 * width, dim), nn.GELU())
        self.heads = nn.ModuleDict({k: nn.Linear(dim, len(v)) for k, v in _HEADS.items()})
        self.dim = dim

    def forward(self, video: Tensor) -> Tensor:
        if video.ndim != 5 or video.shape[2] != 3:
            raise ValueError(f"the toy encoder takes [B, F, 3, H, W] clips, got {tuple(video.shape)}")
        # frames and their temporal differences: motion is explicit, so direction and speed are learnt quickly
        diff = torch.cat([video[:, 1:] - video[:, :-1], torch.zeros_like(video[:, :1])], 1)  # [B, F, 3, H, W]
        return self.body(torch.cat([video, diff], 2).transpose(1, 2))  # [B, dim]

    def logits(self, video: Tensor) -> dict[str, Tensor]:
        h = self(video)
        return {k: head(h) for k, head in self.heads.items()}


def _labels(captions: list[str]) -> dict[str, Tensor]:
    parsed = [parse_caption(c) for c in captions]
    return {k: torch.tensor([vocab.index(p[k]) for p in parsed]) for k, vocab in _HEADS.items()}


def train_encoder(num_frames: int, height: int, width: int, *, seed: int = 10_000, steps: int = 300,
                  batch_size: int = 32, lr: float = 2e-3, progress: bool = True) -> tuple[ToyVideoEncoder, dict]:
    """Train on real clips of ShapesDataset(seed) (keep `seed` apart from training and evaluation seeds).
    Returns the encoder (eval mode) and its held-out attribute accuracies."""
    torch.manual_seed(seed)
    enc = ToyVideoEncoder()
    opt = torch.optim.AdamW(enc.parameters(), lr=lr, weight_decay=1e-4)
    ds = ShapesDataset(num_frames, height, width, seed=seed)
    g = torch.Generator().manual_seed(seed)
    for _ in tqdm(range(steps), desc="toy encoder", disable=not progress, leave=False):
        idx = torch.randint(0, len(ds), (batch_size,), generator=g).tolist()
        items = [ds[i] for i in idx]
        video = torch.stack([s.video for s in items])
        labels = _labels([s.caption for s in items])
        loss = sum(nn.functional.cross_entropy(lo, labels[k]) for k, lo in enc.logits(video).items())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    enc.eval()
    held = ShapesDataset(num_frames, height, width, seed=seed + 1)
    items = [held[i] for i in range(256)]
    with torch.no_grad():
        logits = enc.logits(torch.stack([s.video for s in items]))
    labels = _labels([s.caption for s in items])
    acc = {k: float((lo.argmax(1) == labels[k]).float().mean()) for k, lo in logits.items()}
    return enc, acc


def load_or_train_encoder(cache_dir: str | Path, num_frames: int, height: int, width: int, *, seed: int = 10_000,
                          steps: int = 300, progress: bool = True) -> tuple[ToyVideoEncoder, dict]:
    """The encoder for these clip shapes, trained once and cached under `cache_dir` (keyed by its settings)."""
    from .cache import load_or_train

    key = dict(num_frames=num_frames, height=height, width=width, seed=seed, steps=steps)

    def train():
        enc, acc = train_encoder(num_frames, height, width, seed=seed, steps=steps, progress=progress)
        return enc, {"accuracy": acc}

    enc, info = load_or_train(cache_dir, "toy_encoder", key, lambda info: ToyVideoEncoder(), train,
                              what="toy encoder")
    return enc, info["accuracy"]


@torch.no_grad()
def features(encoder: ToyVideoEncoder, video: Tensor, batch_size: int = 64) -> Tensor:
    return torch.cat([encoder(video[i:i + batch_size].float()) for i in range(0, len(video), batch_size)]).double()


def frechet_distance(a: Tensor, b: Tensor) -> float:
    """Frechet distance between Gaussians fitted to feature sets a [N, D] and b [M, D] (float64)."""
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise ValueError(f"need two [N >= 2, D] feature sets of the same D, got {tuple(a.shape)}, {tuple(b.shape)}")
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    ca, cb = torch.cov(a.T), torch.cov(b.T)
    # Tr((Ca Cb)^1/2) = Tr((Ca^1/2 Cb Ca^1/2)^1/2), whose argument is symmetric PSD: eigenvalues, no sqrtm
    w, v = torch.linalg.eigh(ca)
    root = (v * w.clamp_min(0).sqrt()) @ v.T
    inner = torch.linalg.eigvalsh(root @ cb @ root).clamp_min(0).sqrt().sum()
    return float(((mu_a - mu_b) ** 2).sum() + ca.trace() + cb.trace() - 2 * inner)
