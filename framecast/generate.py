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

from dataclasses import dataclass
from pathlib import Path

import torch

from . import config as C
from .errors import CheckpointError
from .models.codecs import Codec, build_codec
from .models.conditioning import ActionEmbedder, Cond, TextEncoder, build_text_encoder
from .models.denoiser import Denoiser, Guidance
from .models.transformer import build_transformer
from .rollout import generate, rollout
from .sampling import SAMPLERS
from .spec import SamplingSpec
from .train import checkpoint as ckpt

Tensor = torch.Tensor


def build_denoiser(mc: C.ModelConfig, device: str | torch.device = "cpu") -> Denoiser:
    net = build_transformer(mc, device=device)
    actions = ActionEmbedder(mc.num_actions, mc.dim).to(device) if mc.num_actions > 0 else None
    return Denoiser(net, actions)


def text_encoder_for(spec: SamplingSpec, cfg: C.RunConfig) -> TextEncoder:
    """The text encoder a checkpoint was trained with (its spec names it; the config sizes it)."""
    return build_text_encoder(spec.text_encoder, cfg.model.text_dim, spec.text_tokens, cfg.data.seed)


def codec_for(cfg: C.RunConfig) -> Codec:
    return build_codec(cfg.model.codec, cfg.model.in_channels)


def stored_config(src: Path, meta: dict) -> C.RunConfig:
    """The run config a checkpoint stored, upgraded from older layouts (config.upgrade)."""
    try:
        return C.from_dict(C.upgrade(meta["config"]))
    except (KeyError, TypeError, C.ConfigError) as e:
        raise CheckpointError(f"{src / ckpt.META} has no usable config ({e})") from None


def stored_spec(src: Path, meta: dict) -> SamplingSpec:
    return SamplingSpec.from_json(meta.get("sampling"), where=str(src / ckpt.META))


def init_from(denoiser: Denoiser, path: str | Path) -> Path:
    """Load the weights of another stage's checkpoint (its EMA if it kept one)."""
    src = ckpt.resolve(path)
    meta = ckpt.read_meta(src)
    stem = "ema_model" if "model" in meta.get("ema", []) else "model"
    ckpt.load_weights(denoiser, src, stem)
    return src


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

    def encode_prompts(self, prompts: list[str]) -> tuple[Cond, Cond]:
        """(conditional, null) conditioning of a batch of prompts (the null branch is the empty prompt)."""
        return Cond(self.text_encoder.encode(prompts)), Cond(self.text_encoder.encode([""] * len(prompts)))

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


def load(path: str | Path, *, use_ema: bool | None = None, device: str = "cpu") -> LoadedModel:
    """A framecast checkpoint (dir, `ckpt/` root or run-stage dir); EMA weights by default when it kept them."""
    src = ckpt.resolve(path)
    meta = ckpt.read_meta(src)
    cfg, spec = stored_config(src, meta), stored_spec(src, meta)
    model = build_denoiser(cfg.model, device)
    has_ema = "model" in meta.get("ema", [])
    if use_ema and not has_ema:
        raise CheckpointError(f"{src} has no EMA weights (it kept {meta.get('ema', [])})")
    ckpt.load_weights(model, src, "ema_model" if (has_ema and use_ema is not False) else "model")
    return LoadedModel(model.eval(), spec, build_codec(spec.codec, cfg.model.in_channels), text_encoder_for(spec, cfg),
                       cfg, src)
