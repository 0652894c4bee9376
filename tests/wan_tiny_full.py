"""Tiny random Wan2.1 checkpoints with every component, in the layouts users hold, for the end-to-end tests:
a diffusers folder (model_index.json, transformer/, vae/, text_encoder/, tokenizer/), an original folder
(config.json `WanModel`, sharded diffusion_pytorch_model-*.safetensors + index, Wan2.1_VAE.pth,
models_t5_umt5-xxl-enc-bf16.pth, google/umt5-xxl/) and a Causal Forcing `model.pt` (generator_ema behind FSDP
prefixes) to load on either. The transformer (4 latent channels, text_dim 32), the VAE (z_dim 4) and umT5
(d_model 32) fit one another."""

import json
from pathlib import Path

from .wan_tiny import write_diffusers_root, write_official_pt, write_original_folder
from .wan_tiny_text import (
    tiny_umt5_config,
    write_original_umt5_pth,
    write_transformers_text_encoder,
)
from .wan_tiny_vae import write_tiny_vae


def write_tiny_wan(root: Path, *, seed: int = 0) -> tuple[Path, Path, dict]:
    """(diffusers folder, original folder, transformer state dict) with the same weights in both."""
    root = Path(root)
    diff, orig = root / "diffusers", root / "original"
    sd = write_diffusers_root(diff, seed)  # model_index.json + transformer/
    write_tiny_vae(diff, seed=seed)  # vae/
    write_transformers_text_encoder(root / "_text", seed=seed)  # text_encoder/ + tokenizer/ (+ its own index)
    for name in ("text_encoder", "tokenizer"):
        (root / "_text" / name).rename(diff / name)
    index = json.loads((diff / "model_index.json").read_text())
    index.update(vae=["diffusers", "AutoencoderKLWan"], text_encoder=["transformers", "UMT5EncoderModel"],
                 tokenizer=["transformers", "T5TokenizerFast"])
    (diff / "model_index.json").write_text(json.dumps(index, indent=2))
    write_original_folder(orig, sd, shards=2)
    dit_config = (orig / "config.json").read_text()
    write_tiny_vae(orig, original=True, seed=seed)  # Wan2.1_VAE.pth + vae_config.json
    write_original_umt5_pth(orig / "models_t5_umt5-xxl-enc-bf16.pth", seed=seed)  # + google/umt5-xxl/
    (orig / "umt5_config.json").write_text(json.dumps(tiny_umt5_config(), indent=1))  # the tiny encoder's sizes
    (orig / "config.json").write_text(dit_config)  # the umT5 writer put its config there: the DiT's belongs there
    return diff, orig, sd


def write_tiny_cf(path: Path, sd: dict) -> Path:
    """A Causal Forcing frame-wise 2-step release file: `generator_ema` behind `model._fsdp_wrapped_module.`."""
    return write_official_pt(path, sd, ema=True, generator=True)
