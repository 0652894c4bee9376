"""Tiny random Wan2.1 transformer checkpoints in the real on-disk layouts (nothing can be downloaded, so every
format is tested on files written here). Import them in tests as `from .wan_tiny import ...`.

* `write_diffusers_transformer(dir, seed)`: a diffusers `transformer/` folder (config.json and
  diffusion_pytorch_model.safetensors, by `WanTransformer3DModel.save_pretrained`); returns the state dict.
* `write_diffusers_root(dir, seed, components=...)`: `model_index.json` + `transformer/`, plus any other
  component as name -> (library, class name, writer(folder)): the VAE and umT5 fixture writers plug in there.
* `write_original_folder(dir, sd, shards=2)`: the Wan-AI layout: config.json with `_class_name: WanModel` and
  the original field names (patch_size / text_dim only when they differ from WanModel's defaults, as in the
  released files), original tensor names, sharded safetensors + index.json (one file for shards=1). float32
  like the released 1.3B / 14B files; `dtype=torch.bfloat16` writes a bf16 copy.
* `write_official_pt(path, sd, ...)`: a CF / SF style `model.pt` written by plain `torch.save`: `generator_ema`
  with `model._fsdp_wrapped_module.` + original names, `generator` with `model.` + original names.
* `write_framecast_checkpoint(root, sd, ...)`: a framecast checkpoint (train.checkpoint.save) with the meta
  that framecast.generate.load reads (stage, resolved config, sampling spec, roles, EMA list).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import diffusers
import torch
from diffusers import WanTransformer3DModel
from safetensors.torch import save_file

from framecast import config as C
from framecast.models.wan import (
    INDEX,
    WEIGHTS,
    diffusers_to_original,
    model_config,
    preset_spec,
)
from framecast.train import checkpoint as ckpt

StateDict = dict[str, torch.Tensor]
Writer = Callable[[Path], Any]


def tiny_transformer_config() -> dict[str, Any]:
    """WanTransformer3DModel arguments of a model whose forward takes milliseconds (2 heads x 16, 2 layers)."""
    return dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
                text_dim=32, freq_dim=16, ffn_dim=32, num_layers=2, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)


def write_diffusers_transformer(folder: str | Path, seed: int = 0, config: dict[str, Any] | None = None) -> StateDict:
    """A diffusers transformer folder with random weights (every parameter ~ N(0, 0.2^2), seeded)."""
    model = WanTransformer3DModel(**(config or tiny_transformer_config()))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    model.save_pretrained(str(folder))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def write_diffusers_root(root: str | Path, seed: int = 0, *, config: dict[str, Any] | None = None,
                         components: dict[str, tuple[str, str, Writer]] | None = None) -> StateDict:
    """A diffusers Wan folder: model_index.json, transformer/ and each extra component's folder, written by its
    writer (e.g. components={"vae": ("diffusers", "AutoencoderKLWan", write_vae)}). Returns the transformer's
    state dict."""
    root = Path(root)
    index: dict[str, Any] = {"_class_name": "WanPipeline", "_diffusers_version": diffusers.__version__,
                             "transformer": ["diffusers", "WanTransformer3DModel"]}
    sd = write_diffusers_transformer(root / "transformer", seed, config)
    for name, (library, cls, writer) in (components or {}).items():
        (root / name).mkdir(parents=True, exist_ok=True)
        writer(root / name)
        index[name] = [library, cls]
    (root / "model_index.json").write_text(json.dumps(index, indent=2))
    return sd


def original_config(config: dict[str, Any] | None = None, text_len: int = 16) -> dict[str, Any]:
    """The config.json of the original layout for these diffusers arguments."""
    c = config or tiny_transformer_config()
    out = {"_class_name": "WanModel", "_diffusers_version": "0.30.0",
           "dim": c["num_attention_heads"] * c["attention_head_dim"], "eps": c["eps"], "ffn_dim": c["ffn_dim"],
           "freq_dim": c["freq_dim"], "in_dim": c["in_channels"], "model_type": "t2v",
           "num_heads": c["num_attention_heads"], "num_layers": c["num_layers"], "out_dim": c["out_channels"],
           "text_len": text_len}
    if list(c["patch_size"]) != [1, 2, 2]:  # written only when not WanModel's default, as the released files do
        out["patch_size"] = list(c["patch_size"])
    if c["text_dim"] != 4096:
        out["text_dim"] = c["text_dim"]
    return out


def write_original_folder(folder: str | Path, sd: StateDict, shards: int = 2, *, config: dict[str, Any] | None = None,
                          dtype: torch.dtype | None = None) -> Path:
    """The original Wan-AI folder of diffusers weights `sd`: config.json + (sharded) safetensors."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(original_config(config), indent=2))
    orig = {k: (v.to(dtype) if dtype else v).contiguous() for k, v in diffusers_to_original(sd).items()}
    if shards == 1:
        save_file(orig, str(folder / f"{WEIGHTS}.safetensors"))
        return folder
    keys, weight_map = list(orig), {}
    for i in range(shards):
        name = f"{WEIGHTS}-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: orig[k] for k in keys[i::shards]}
        save_file(part, str(folder / name))
        weight_map.update(dict.fromkeys(part, name))
    total = sum(v.numel() * v.element_size() for v in orig.values())
    (folder / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return folder


def write_official_pt(path: str | Path, sd: StateDict, *, ema: bool = True, generator: bool = True,
                      generator_sd: StateDict | None = None, critic: bool = False, drop: tuple[str, ...] = (),
                      prefixes: tuple[str, ...] = ("model.", "_fsdp_wrapped_module.")) -> Path:
    """A CF / SF `model.pt`: `generator_ema` (weights `sd`, names behind `prefixes`) and/or `generator` (weights
    `generator_sd` or `sd`, names behind `model.`), optionally a `critic`; `drop` leaves original names out."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    def named(weights: StateDict, prefix: str) -> StateDict:
        return {prefix + k: v.clone() for k, v in diffusers_to_original(weights).items() if k not in drop}

    out: dict[str, Any] = {}
    if ema:
        out["generator_ema"] = named(sd, "".join(prefixes))
    if generator:
        out["generator"] = named(generator_sd if generator_sd is not None else sd, "model.")
    if critic:
        out["critic"] = named(sd, "model.")
    torch.save(out, path)
    return path


def write_framecast_checkpoint(root: str | Path, sd: StateDict, *, ema_sd: StateDict | None = None,
                               preset: str = "framewise-2step", config: dict[str, Any] | None = None,
                               num_frames: int = 2, height: int = 4, width: int = 4, text_tokens: int = 4) -> Path:
    """A framecast checkpoint under `root` (a ckpt/ root) of transformer weights `sd` (+ EMA `ema_sd`), sampling as
    the official `preset` with the identity codec and the hash text encoder; returns the step folder."""
    mc = model_config(config or tiny_transformer_config())
    data = dict(text_encoder="hash", text_tokens=text_tokens, num_frames=num_frames, height=height, width=width)
    cfg = C.from_dict({"stage": "dmd", "model": C.to_dict(mc), "data": data})
    shape = (mc.in_channels, height, width)
    spec = preset_spec(preset, latent_shape=shape, pixel_shape=shape, num_frames=num_frames, codec="identity",
                       text_encoder="hash", text_tokens=text_tokens)
    weights = {"model": {f"net.{k}": v for k, v in sd.items()}}
    if ema_sd is not None:
        weights["ema_model"] = {f"net.{k}": v for k, v in ema_sd.items()}
    meta = {"stage": "dmd", "sampling": spec.to_json(), "config": C.to_dict(cfg), "roles": ["model"],
            "ema": ["model"] if ema_sd is not None else []}
    return ckpt.save(root, 1, weights=weights, meta=meta)
