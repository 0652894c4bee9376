"""Recipes: which networks a stage has, what initialises them, how its checkpoint samples.

Stage 0 trains the bidirectional base (full attention, one sigma per video). Stage 1 initialises the AR
student from it and trains with teacher forcing (or diffusion forcing, the baseline), spec §4. Each stage
writes `runs/<name>/<stage>/` with config.yaml, metrics.jsonl, ckpt/, samples/ and loss.png.

The checkpoint's meta says how to sample it (`sampling`): causal or not, block size, window, sampler,
steps and guidance, so `framecast sample` needs nothing but the checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from . import config as C
from . import flow
from .data.sources import build_source
from .media import grid, plot_metrics, write_video
from .models.codecs import IdentityCodec
from .models.conditioning import ActionEmbedder, Cond, build_text_encoder
from .models.denoiser import Denoiser, Guidance
from .models.transformer import build_transformer
from .objectives.diffusion import FlowMatching
from .rollout import generate
from .sampling import SAMPLERS
from .train import checkpoint as ckpt
from .train.loop import Trainer

STAGE_MODES = {"stage0": "bidirectional", "stage1": None}  # stage1 uses objective.mode (TF or DF)


def build_denoiser(mc: C.ModelConfig, device: str | torch.device = "cpu") -> Denoiser:
    net = build_transformer(mc, device=device)
    actions = ActionEmbedder(mc.num_actions, mc.dim).to(device) if mc.num_actions > 0 else None
    return Denoiser(net, actions)


def sampling_meta(cfg: C.RunConfig, mode: str) -> dict[str, Any]:
    causal = mode != "bidirectional"
    return {
        "causal": causal,
        "mode": mode,
        "block_size": cfg.objective.block_size if causal else None,  # None: one block spanning the video
        "window": cfg.objective.window if causal else 0,
        "sink": cfg.objective.sink if causal else 0,
        "sampler": "euler",
        "steps": cfg.sample.steps,
        "shift": cfg.flow.shift,
        "guidance": cfg.sample.guidance,
        "num_frames": cfg.data.num_frames,
        "frame_shape": [cfg.model.in_channels, cfg.data.height, cfg.data.width],
        "text_encoder": cfg.data.text_encoder,
        "text_tokens": cfg.data.text_tokens,
        "few_step": False,
    }


def stage_mode(cfg: C.RunConfig) -> str:
    if cfg.stage not in STAGE_MODES:
        raise C.ConfigError(f"unknown stage {cfg.stage!r}; this version trains {sorted(STAGE_MODES)}")
    return STAGE_MODES[cfg.stage] or cfg.objective.mode


def init_from(denoiser: Denoiser, path: str) -> Path:
    """Load the weights of another stage's checkpoint (its EMA if it kept one)."""
    src = ckpt.resolve(path)
    meta = ckpt.read_meta(src)
    stem = "ema_model" if "model" in meta.get("ema", []) else "model"
    ckpt.load_weights(denoiser, src, stem)
    return src


def make_sample_fn(cfg: C.RunConfig, meta: dict[str, Any], source):
    prompts = cfg.sample.prompts

    def sample_fn(step: int, roles: dict[str, torch.nn.Module], out_dir: Path) -> None:
        model = roles["model"]
        cond, null = source.encode_prompts(prompts)
        video = sample(model, meta, cond, null, num_frames=cfg.sample.num_frames, seed=cfg.sample.seed)
        g = grid(video)
        write_video(g, out_dir / f"step_{step:07d}.gif", fps=cfg.sample.fps)
        write_video(g, out_dir / f"step_{step:07d}.mp4", fps=cfg.sample.fps)

    return sample_fn


@torch.no_grad()
def sample(model: Denoiser, meta: dict[str, Any], cond: Cond, null: Cond, *, num_frames: int, seed: int = 0,
           steps: int | None = None, guidance: float | None = None, window: int | None = None,
           sink: int | None = None, context: torch.Tensor | None = None) -> torch.Tensor:
    """Sample [B, F, C, H, W] as the checkpoint's meta says (streaming with a KV cache for causal models)."""
    C_, H, W = meta["frame_shape"]
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(cond.batch, num_frames, C_, H, W, generator=g).to(cond.text.device)
    steps = steps or meta["steps"]
    scale = meta["guidance"] if guidance is None else guidance
    block = meta["block_size"] if meta["causal"] else num_frames
    return generate(
        model, noise, cond, sampler=SAMPLERS[meta["sampler"]], sigmas=flow.grid(steps, meta["shift"]).float(),
        block_size=block, window=meta["window"] if window is None else window,
        sink=meta["sink"] if sink is None else sink, guidance=Guidance(scale, null), context=context, generator=g)


def train_stage(cfg: C.RunConfig) -> Path:
    """Train one stage; returns its newest checkpoint directory."""
    mode = stage_mode(cfg)
    torch.manual_seed(cfg.train.seed)  # parameter init
    model = build_denoiser(cfg.model, cfg.train.device)
    if cfg.init:
        init_from(model, cfg.init)
    obj_cfg = C.ObjectiveConfig(**{**C.to_dict(cfg.objective), "mode": mode})
    objective = FlowMatching(model, cfg.flow, obj_cfg)
    text = build_text_encoder(cfg.data.text_encoder, cfg.model.text_dim, cfg.data.text_tokens, cfg.data.seed)
    source = build_source(cfg.data, text, IdentityCodec(cfg.model.in_channels))
    meta = {"stage": cfg.stage, "sampling": sampling_meta(cfg, mode)}
    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    C.dump(cfg, run_dir / "config.yaml")
    # vector videos are not images: no sample videos for them (their metrics come from the analytic teachers)
    sample_fn = make_sample_fn(cfg, meta["sampling"], source) if cfg.data.name == "shapes" else None
    trainer = Trainer(cfg, objective, source, run_dir=run_dir, meta=meta, sample_fn=sample_fn)
    trainer.fit()
    plot_metrics(trainer.metrics_path, run_dir / "loss.png", keys=("loss",))
    return ckpt.resolve(run_dir)


def load_model(path: str | Path, *, use_ema: bool | None = None, device: str = "cpu"):
    """(denoiser, meta, cfg) from a checkpoint; EMA weights by default when the checkpoint kept them."""
    src = ckpt.resolve(path)
    meta = ckpt.read_meta(src)
    try:
        cfg = C.from_dict(meta["config"])
    except (KeyError, C.ConfigError) as e:
        raise ckpt.CheckpointError(f"{src / ckpt.META} has no usable config ({e})") from None
    model = build_denoiser(cfg.model, device)
    has_ema = "model" in meta.get("ema", [])
    if use_ema and not has_ema:
        raise ckpt.CheckpointError(f"{src} has no EMA weights (it kept {meta.get('ema', [])})")
    ckpt.load_weights(model, src, "ema_model" if (has_ema and use_ema is not False) else "model")
    return model.eval(), meta, cfg
