"""A tiny Wan VAE for tests: the Wan2.1 structure (dim_mult [1, 2, 4, 4], 2 residual blocks, temporal
downsampling [False, True, True], so stride (4, 8, 8) and the original layout diffusers' own converter
expects) at base_dim 8 and z_dim 4, with seeded random weights.

    from tests.wan_tiny_vae import write_tiny_vae
    src = write_tiny_vae(tmp_path)                  # tmp_path/vae/ (diffusers): build_codec("wan_vae", 4, src)
    src = write_tiny_vae(tmp_path, original=True)   # tmp_path/Wan2.1_VAE.pth + vae_config.json beside it
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from framecast.models import wan_vae as W

TINY_VAE = {"base_dim": 8, "z_dim": 4, "dim_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_scales": [],
            "temperal_downsample": [False, True, True], "dropout": 0.0,
            "latents_mean": [0.1, -0.2, 0.3, -0.4], "latents_std": [1.5, 0.5, 2.0, 1.0]}


def tiny_vae(seed: int = 0):
    """An AutoencoderKLWan of TINY_VAE: diffusers' init from `seed`, weights scaled by 1 + N(0, 0.25) and
    vectors shifted by N(0, 0.01), so that every path matters and outputs are rarely clamped."""
    torch.manual_seed(seed)
    vae = W.build_vae(W.vae_config(TINY_VAE)).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in vae.parameters():
            if p.ndim > 1:
                p.mul_(1 + 0.5 * torch.randn(p.shape, generator=g))
            else:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return vae


def write_tiny_vae(dir: str | Path, *, original: bool = False, seed: int = 0) -> Path:
    """Put a tiny VAE under `dir`: a diffusers `dir/vae/` folder (returns it), or with `original` an original
    `dir/Wan2.1_VAE.pth` (written through framecast's inverse rename table) and its `vae_config.json`
    (returns the .pth). Either path is a `source` for build_codec("wan_vae", 4, source)."""
    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    vae = tiny_vae(seed)
    if not original:
        vae.save_pretrained(dir / "vae")
        return dir / "vae"
    torch.save(W.to_original(vae.state_dict(), W.vae_config(TINY_VAE)), dir / W.ORIGINAL_FILE)
    (dir / W.SIDECAR_CONFIG).write_text(json.dumps({"_class_name": "AutoencoderKLWan", **TINY_VAE}))
    return dir / W.ORIGINAL_FILE
