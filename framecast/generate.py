"""The sampling API: load a checkpoint into a `LoadedModel` (denoiser + SamplingSpec + codec + text encoder)
and sample or stream from it.

    from framecast.generate import load
    m = load("runs/quickstart/dmd_2step")              # EMA weights by default, when the run kept them
    video = m.sample(["a red circle moving right slow"], num_frames=8, seed=0)    # pixels [B, F, C, H, W]

`sample` / `stream` work on latents through the one `rollout` loop with a KV cache for causal models;
`LoadedModel.decode` is the one decode point of every output path (sample files, health, eval), and
`stream.Session` decodes its stream through the codec's streaming decoder. Nothing here knows which
method trained a checkpoint: its `SamplingSpec` says how to sample it (spec.py).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from . import config as C
from .errors import CheckpointError, ConfigError
from .models.codecs import Codec, build_codec
from .models.conditioning import ActionEmbedder, Cond, TextEncoder, build_text_encoder
from .models.denoiser import Denoiser, Guidance
from .models import wan
from .models.transformer import build_transformer
from .rollout import generate, rollout
from .sampling import SAMPLERS
from .spec import SamplingSpec
from .train import checkpoint as ckpt

Tensor = torch.Tensor


def build_denoiser(mc: C.ModelConfig, device: str | torch.device = "cpu") -> Denoiser:
    net = build_transformer(mc, device=device)
    if mc.action_tokens and not mc.num_actions:
        raise C.ConfigError("model.action_tokens needs actions: set model.num_actions > 0")
    actions = (ActionEmbedder(mc.num_actions, mc.dim, mc.action_init_std, mc.action_tokens).to(device)
               if mc.num_actions > 0 else None)
    return Denoiser(net, actions)


def text_encoder_for(spec: SamplingSpec, cfg: C.RunConfig) -> TextEncoder:
    """The text encoder a checkpoint was trained with (its spec names it; the config sizes it and says where
    its weights are)."""
    return build_text_encoder(spec.text_encoder, cfg.model.text_dim, spec.text_tokens, cfg.data.seed,
                              source=cfg.data.text_encoder_source or None)


def codec_for(cfg: C.RunConfig) -> Codec:
    return build_codec(cfg.model.codec, cfg.model.in_channels, source=cfg.model.codec_source or None)


def read_meta(src: Path) -> dict:
    """A checkpoint's meta.json: a JSON object whose `ema` (if any) lists weight names, or a CheckpointError
    naming the file."""
    meta = ckpt.read_meta(src)
    if not isinstance(meta, dict):
        raise CheckpointError(f"checkpoint file {src / ckpt.META} must hold a JSON object, not a "
                              f"{type(meta).__name__}")
    if not isinstance(meta.get("ema", []), list):
        raise CheckpointError(f"checkpoint file {src / ckpt.META}: `ema` must list weight names, got {meta['ema']!r}")
    return meta


def stored_config(src: Path, meta: dict) -> C.RunConfig:
    """The run config a checkpoint stored, upgraded from older layouts (config.upgrade)."""
    if not isinstance(meta.get("config"), dict):
        raise CheckpointError(f"checkpoint file {src / ckpt.META} has no `config` mapping (the run's config)")
    try:
        return C.from_dict(C.upgrade(meta["config"]))
    except (C.ConfigError, TypeError) as e:
        raise CheckpointError(f"checkpoint file {src / ckpt.META} has no usable config ({e})") from None


def stored_spec(src: Path, meta: dict) -> SamplingSpec:
    return SamplingSpec.from_json(meta.get("sampling"), where=f"checkpoint file {src / ckpt.META}")


def describe(path: str | Path) -> tuple[C.ModelConfig, str]:
    """(model config, generator mode) of any loadable model, read from its metadata only (no weights): what a
    stage needs to build a role on the meta device before each rank loads its shards (train/sharded_load.py)."""
    try:
        src = ckpt.resolve(path)
    except CheckpointError:
        if ckpt.pretrained.is_name(path):
            raise
        fmt = wan.detect(path)
        if fmt in ("framecast", "official"):  # an official release needs its Wan base: load it whole
            raise CheckpointError(f"{path} ({fmt}) cannot be described without loading it; convert it first "
                                  f"(framecast convert {path} --base <Wan folder> --out <dir>)") from None
        return wan.model_config(path), "bidirectional"
    meta = read_meta(src)
    return stored_config(src, meta).model, stored_spec(src, meta).mode


@torch.no_grad()
def sample(model: Denoiser, spec: SamplingSpec, cond: Cond, null: Cond, *, num_frames: int, seed: int = 0,
           steps: int | None = None, guidance: float | None = None, window: int | None = None,
           sink: int | None = None, context: Tensor | None = None, sampler: str | None = None,
           denoising_steps: list[int] | None = None, force: bool = False, as_stream: bool = False):
    """Latents [B, F, C, H, W] as the spec says (streaming with a KV cache for causal models).

    `sampler` / `denoising_steps` / `steps` override the spec's schedule (SamplingSpec.schedule refuses
    the wrong kind of sampler unless `force`, architecture.md §5).
    """
    sched = spec.schedule(sampler=sampler, steps=steps, denoising_steps=denoising_steps, force=force)
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(cond.batch, num_frames, *spec.latent_shape, generator=g).to(cond.text.device)
    scale = spec.guidance if guidance is None else guidance
    kw = dict(sampler=SAMPLERS[sched.sampler], sigmas=sched.sigmas, first_sigmas=sched.first_sigmas,
              block_size=spec.block(num_frames), window=spec.window if window is None else window,
              sink=spec.sink if sink is None else sink, guidance=Guidance(scale, null) if scale != 1.0 else None,
              context=context, generator=g)
    if as_stream:
        return rollout(model, noise, cond, commit_last=False, **kw)
    return generate(model, noise, cond, **kw)


def stream(model: Denoiser, spec: SamplingSpec, cond: Cond, null: Cond, *, num_frames: int, **kw):
    """`sample`, but an iterator of `rollout` blocks, each yielded as soon as it is generated."""
    return sample(model, spec, cond, null, num_frames=num_frames, as_stream=True, **kw)


@dataclass
class LoadedModel:
    """A checkpoint ready to sample: what `load` returns."""

    denoiser: Denoiser
    spec: SamplingSpec
    codec: Codec
    text_encoder: TextEncoder
    config: C.RunConfig
    path: Path | None = None
    info: dict = dataclasses.field(default_factory=dict)  # what was read: format, weights, sampling preset

    def encode_prompts(self, prompts: list[str]) -> tuple[Cond, Cond]:
        """(conditional, null) conditioning of a batch of prompts (the null branch: the spec's negative prompt)."""
        null = [self.spec.negative_prompt] * len(prompts)
        return Cond(self.text_encoder.encode(prompts)), Cond(self.text_encoder.encode(null))

    def at_size(self, height: int, width: int) -> LoadedModel:
        """This model sampling frames of height x width pixels; a size the codec or the patch cannot divide is
        one ConfigError naming both factors."""
        pixel = (self.codec.pixel_channels, height, width)
        latent = self.codec.latent_shape(pixel)
        ph, pw = self.config.model.patch_size[1:]
        if latent[1] % ph or latent[2] % pw:
            raise ConfigError(f"{height}x{width} px gives {latent[1]}x{latent[2]} latents, not divisible by the "
                              f"patch size {ph}x{pw}; choose a size divisible by both the codec and the patch")
        return dataclasses.replace(self, spec=self.spec.at_size(pixel, latent))

    def sample_latents(self, prompts: list[str], *, num_frames: int | None = None, seed: int = 0, **kw) -> Tensor:
        cond, null = self.encode_prompts(prompts)
        return sample(self.denoiser, self.spec, cond, null, num_frames=num_frames or self.spec.num_frames,
                      seed=seed, **kw)

    def decode(self, latents: Tensor) -> Tensor:
        """Pixels [B, F', C, H, W] in [-1, 1] of latents [B, F, C', H', W']: the one decode point."""
        return self.codec.decode(latents)

    def sample(self, prompts: list[str], **kw) -> Tensor:
        return self.decode(self.sample_latents(prompts, **kw))

    def stream(self, prompts: list[str], *, num_frames: int | None = None, **kw):
        cond, null = self.encode_prompts(prompts)
        return stream(self.denoiser, self.spec, cond, null, num_frames=num_frames or self.spec.num_frames, **kw)


def load(path: str | Path, *, base: str | Path | None = None, use_ema: bool | None = None, device: str = "cpu",
         preset: str | None = None) -> LoadedModel:
    """Any model a user holds, ready to sample: a framecast checkpoint (dir, `ckpt/` root or run-stage dir), a
    Wan2.1 folder (diffusers or original layout) or an official Causal Forcing / Self Forcing / CausVid `model.pt`
    on a `base` Wan folder (models/wan.py). EMA weights by default when the checkpoint kept them; `info` says
    what was read (format, which weights, the sampling preset)."""
    try:  # a framecast checkpoint: the newest complete one (train/checkpoint.py scans; the pointer is a hint)
        src = ckpt.resolve(path)
    except CheckpointError:
        if ckpt.pretrained.is_name(path):  # a shipped model's own error (unknown name, checksum)
            raise
        fmt = wan.detect(path)  # a Wan folder or release; anything else is one error naming what it found
        if fmt == "framecast":
            raise
        return _load_wan(path, fmt, base=base, use_ema=use_ema, device=device, preset=preset)
    meta = read_meta(src)
    cfg, spec = stored_config(src, meta), stored_spec(src, meta)
    if base is not None:  # a converted Wan checkpoint whose VAE and text encoder now live elsewhere
        cfg = _on_base(cfg, base)
    model = build_denoiser(cfg.model, device)
    has_ema = "model" in meta.get("ema", [])
    if use_ema and not has_ema:
        raise CheckpointError(f"{src} has no EMA weights (it kept {meta.get('ema', [])})")
    ckpt.load_weights(model, src, "ema_model" if (has_ema and use_ema is not False) else "model")
    info = {"format": "framecast", "path": str(src), "key": "ema_model" if has_ema and use_ema is not False else "model"}
    return LoadedModel(model.eval(), spec, codec_for(cfg), text_encoder_for(spec, cfg), cfg, src, info)


# Wan2.1 text-to-video defaults (Wan2.1 release, arXiv 2503.20314): 480x832 pixels, 81 frames at 16 fps, umT5
# prompts of 512 tokens. Only these user-facing defaults are named here; every shape is derived from them.
WAN_DEFAULTS = {"height": 480, "width": 832, "frames": 81, "fps": 16, "text_tokens": 512}
WAN_PROMPT = "a red fox running through fresh snow in a pine forest, golden hour"


def _on_base(cfg: C.RunConfig, base: str | Path) -> C.RunConfig:
    """`cfg` with its codec and text encoder read from the Wan folder `base`."""
    comps = wan.components(base)
    missing = [k for k in ("vae", "text_encoder") if not comps.get(k)]
    if missing:
        raise CheckpointError(f"{base} has no {' or '.join(missing)} (a Wan2.1 folder holds vae/ and text_encoder/, or "
                              f"Wan2.1_VAE.pth and models_t5_umt5-xxl-enc-bf16.pth)")
    return C.from_dict({"model": {"codec": "wan_vae", "codec_source": str(Path(comps["vae"]).resolve())},
                        "data": {"text_encoder": "umt5", "text_encoder_source": str(Path(comps["text_encoder"]).resolve()),
                                 "text_tokens": WAN_DEFAULTS["text_tokens"]}}, base=cfg)


def _load_wan(path, fmt: str, *, base, use_ema, device, preset) -> LoadedModel:
    net, info = wan.load_transformer(path, base=base, use_ema=use_ema, device=device)
    name = preset or info.get("preset") or ("bidirectional-euler" if fmt != "official" else None)
    if name is None:
        raise ConfigError(f"which sampling preset does {path} use? pass one of {sorted(wan.SAMPLING_PRESETS)} "
                          f"(--preset)")
    info["preset"] = name
    cfg = _on_base(C.from_dict({"model": C.to_dict(info["config"])}), base if fmt == "official" else path)
    codec = codec_for(cfg)
    pixel = (codec.pixel_channels, WAN_DEFAULTS["height"], WAN_DEFAULTS["width"])
    frames = codec.latent_frames(WAN_DEFAULTS["frames"])
    spec = wan.preset_spec(name, latent_shape=codec.latent_shape(pixel), pixel_shape=pixel, num_frames=frames,
                           codec=codec.name, text_encoder="umt5", text_tokens=cfg.data.text_tokens)
    stage = "stage0" if not spec.causal else "dmd" if spec.few_step else "stage1"
    cfg = C.from_dict({"stage": stage, "data": {"height": pixel[1], "width": pixel[2], "num_frames": WAN_DEFAULTS["frames"]},
                       "objective": {"block_size": spec.block_size or 1},
                       "sample": {"fps": WAN_DEFAULTS["fps"], "prompts": [WAN_PROMPT], "num_frames": frames}}, base=cfg)
    return LoadedModel(Denoiser(net).eval(), spec, codec, text_encoder_for(spec, cfg), cfg, Path(path), info)


def convert(path: str | Path, out: str | Path, *, base: str | Path | None = None, use_ema: bool | None = None,
            preset: str | None = None) -> Path:
    """Write any loadable model as a framecast checkpoint (safetensors weights, its config and SamplingSpec);
    the VAE and text encoder are referenced by path (config model.codec_source, data.text_encoder_source)."""
    out = Path(out)
    if out.exists():
        raise CheckpointError(f"{out} already exists; refusing to overwrite it (choose another --out)")
    m = load(path, base=base, use_ema=use_ema, preset=preset)
    meta = {"stage": m.config.stage, "sampling": m.spec.to_json(), "config": C.to_dict(m.config), "roles": ["model"],
            "ema": [], "converted_from": {k: v for k, v in m.info.items() if k in ("format", "path", "key", "preset")}}
    return ckpt.save(out / "ckpt", 0, weights={"model": m.denoiser.state_dict()}, meta=meta)
