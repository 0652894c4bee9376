"""Typed configuration: dataclasses with one home for every default, named presets, YAML, strict overrides.

A run is described by one `RunConfig`. It is built in three layers, each strict (an unknown key or a
value of the wrong type is a `ConfigError` naming the key):

    defaults (this file)  ->  YAML recipe (`configs/*.yaml`)  ->  command-line `a.b=c` overrides

`model.preset` names a size preset (`tiny`, `toy`, `wan2.1-1.3b`, `wan2.1-14b`); keys next to it override
it. The resolved config is written into every run and checkpoint (architecture.md §5).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError
from .schema import build as _build
from .schema import parse_override, to_dict

__all__ = ["ConfigError", "RunConfig", "from_dict", "load", "load_recipe", "parse_override", "to_dict", "upgrade"]


# --- Schemas ---


@dataclass
class ModelConfig:
    """The one transformer. Field names follow diffusers' `WanTransformer3DModel` arguments."""

    preset: str = "tiny"
    patch_size: tuple[int, int, int] = (1, 4, 4)  # (t, h, w); Wan2.1 uses (1, 2, 2) on VAE latents
    num_heads: int = 2
    head_dim: int = 16
    in_channels: int = 3
    out_channels: int = 3
    text_dim: int = 32
    freq_dim: int = 32  # sinusoidal time-embedding width
    ffn_dim: int = 64
    num_layers: int = 2
    cross_attn_norm: bool = True
    eps: float = 1e-6
    rope_max_seq_len: int = 1024  # only sizes the stock RoPE table; our RoPE is computed from positions
    num_actions: int = 0  # > 0 adds a zero-initialised per-frame action embedder (world models)
    attention_backend: str = "sdpa"  # sdpa (dense boolean mask, CPU + training) | flex (CUDA, opt-in)
    gradient_checkpointing: bool = False
    codec: str = "identity"  # the latent codec (models/codecs.py): identity = the frames are the latents (toys)
    codec_source: str = ""  # the codec's weights (a Wan VAE folder or .pth); identity needs none

    @property
    def dim(self) -> int:
        return self.num_heads * self.head_dim


MODEL_PRESETS: dict[str, dict[str, Any]] = {
    # unit tests: a forward in milliseconds
    "tiny": dict(num_heads=2, head_dim=16, ffn_dim=64, num_layers=2, text_dim=32, freq_dim=32,
                 patch_size=(1, 4, 4), in_channels=3, out_channels=3),
    # the quickstart model: 32x32 RGB frames as 8x8 tokens, MiniLM text (384-d). Head dim 64, not 32:
    # Wan's 3-axis RoPE gives the h and w axes 2*(head_dim//6) channels each, and with 32 only ~2 of their
    # 5 frequencies separate 8 positions, which left samples as scattered patches (docs/core_engine.md)
    "toy": dict(num_heads=2, head_dim=64, ffn_dim=512, num_layers=4, text_dim=384, freq_dim=64,
                patch_size=(1, 4, 4), in_channels=3, out_channels=3),
    # Wan2.1 T2V (method.md §3.2); instantiate on the meta device on CPU
    "wan2.1-1.3b": dict(num_heads=12, head_dim=128, ffn_dim=8960, num_layers=30, text_dim=4096,
                        freq_dim=256, patch_size=(1, 2, 2), in_channels=16, out_channels=16),
    "wan2.1-14b": dict(num_heads=40, head_dim=128, ffn_dim=13824, num_layers=40, text_dim=4096,
                       freq_dim=256, patch_size=(1, 2, 2), in_channels=16, out_channels=16),
}


@dataclass
class FlowConfig:
    """Rectified-flow schedule (method.md §2). Sigmas are exact; no 1000-point snapping at sampling time."""

    shift: float = 5.0
    num_train_timesteps: int = 1000  # the grid training sigmas are drawn from
    weighting: str = "bell"  # bell (Stage-1 "bsmntw" weight, method.md §2) | uniform


@dataclass
class DataConfig:
    name: str = "shapes"  # shapes | vectors | episodes (recorded by `framecast record`)
    path: str = ""  # episodes only: the recording's folder
    num_frames: int = 8
    height: int = 32
    width: int = 32
    seed: int = 0
    length: int = 100_000  # virtual dataset size; samples are generated on demand
    text_encoder: str = "hash"  # hash | minilm | umt5
    text_encoder_source: str = ""  # the text encoder's weights and tokenizer (umt5: a folder or .pth)
    text_tokens: int = 16
    # vectors only: frames are `dim`-vectors from a Gaussian mixture (data/vectors.py)
    vector_dim: int = 2
    vector_components: int = 2
    vector_std: float = 0.05


@dataclass
class ObjectiveConfig:
    name: str = "diffusion"
    # diffusion: bidirectional (Stage 0) | teacher_forcing (Stage 1, TF) | diffusion_forcing (Stage 1, DF)
    mode: str = ""  # "" = the stage's own mode (stages.py); only stage1 has a choice (TF or DF)
    block_size: int = 1  # K latent frames per AR block (1 frame-wise, 3 chunk-wise)
    window: int = 0  # attention window in frames, counting the current block; 0 = unbounded
    sink: int = 0  # frames at the start that stay visible when a window is set
    text_dropout: float = 0.1  # caption dropout so the model also learns the unconditional velocity (CFG)


@dataclass
class FewStepConfig:
    """The schedule of a few-step generator (stages ode, cd, dmd; method.md §2, §7.6).

    Step lists use the reference configs' warped convention (method.md §12.3): [1000, 500] means sigmas
    shift(1.0), shift(0.5) = 1, .8333 at shift 5.
    """

    denoising_steps: list[int] = field(default_factory=lambda: [1000, 750, 500, 250])
    first_block_steps: list[int] = field(default_factory=list)  # the first block's own schedule; [] = the same


@dataclass
class ODEConfig:
    """Stage 2a, causal ODE initialisation (method.md §5). Checkpoint paths accept `@<stage>` in a recipe."""

    teacher: str = ""  # the Stage-1 AR teacher (the Stage-0 base for the bidirectional baseline)
    teacher_kind: str = "causal"  # causal (AR teacher, clean GT context) | bidirectional (Self Forcing baseline)
    grid_steps: int = 48  # N of the teacher's Euler grid; the few-step sigmas must lie on it (method.md §5.1)
    guidance: float = 3.0  # teacher CFG; the reference uses 6 for ODE and 3 for CD (method.md §12.2)
    num_pairs: int = 256  # ODE trajectories to generate
    shard_size: int = 64  # trajectories per shard of the pair store
    pairs_dir: str = ""  # where the pair store lives; default <run dir>/pairs
    pair_mode: str = "cached"  # cached (block-wise with the KV cache) | packed (teacher-forcing forward)


@dataclass
class CDConfig:
    """Stage 2b, causal consistency distillation (Causal Forcing++, method.md §6)."""

    teacher: str = ""  # the Stage-1 AR teacher
    grid_steps: int = 48  # N of the consistency grid; the few-step sigmas must lie on it
    guidance: float = 3.0  # teacher CFG of the online Euler step
    target_decay: float = 0.99  # EMA target network of the student (method.md §6)


@dataclass
class DMDConfig:
    """Stage 3, asymmetric DMD with self-rollout (method.md §7)."""

    real: str = ""  # the real score: the bidirectional base, frozen
    critic: str = ""  # the fake score's initialisation: the bidirectional base (method.md §7.1)
    real_guidance: float = 4.0  # u + g (c - u); the reference's x_c + 3 (x_c - x_u) is g = 4 (method.md §12.1)
    critic_ratio: int = 5  # critic updates per generator update (method.md §7.5)
    critic_lr: float = 4.0e-7
    critic_betas: tuple[float, float] = (0.0, 0.999)
    sigma_min: float = 0.02  # noise levels: shift(U{0..999}/1000) clamped to [min, max] (method.md §7.3)
    sigma_max: float = 0.98
    context_sigma: float = 0.0  # noise level of the committed context in self-rollout (0: clean, method.md §12.8)


# `distill:` held every method's knobs until they were split by method; old recipes get a "moved to" error
# and old checkpoints are upgraded silently (`upgrade`).
MOVED = {
    "denoising_steps": ["few_step.denoising_steps"], "first_block_steps": ["few_step.first_block_steps"],
    "grid_steps": ["ode.grid_steps", "cd.grid_steps"], "teacher": ["ode.teacher", "cd.teacher"],
    "guidance": ["ode.guidance", "cd.guidance"], "ode_teacher": ["ode.teacher_kind"],
    "num_pairs": ["ode.num_pairs"], "shard_size": ["ode.shard_size"], "pairs_dir": ["ode.pairs_dir"],
    "pair_mode": ["ode.pair_mode"], "target_decay": ["cd.target_decay"], "real": ["dmd.real"],
    "critic": ["dmd.critic"], "real_guidance": ["dmd.real_guidance"], "critic_ratio": ["dmd.critic_ratio"],
    "critic_lr": ["dmd.critic_lr"], "critic_betas": ["dmd.critic_betas"], "dmd_sigma_min": ["dmd.sigma_min"],
    "dmd_sigma_max": ["dmd.sigma_max"], "context_sigma": ["dmd.context_sigma"],
}


@dataclass
class TrainConfig:
    steps: int = 100
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.01
    grad_clip: float = 10.0
    warmup: int = 0  # linear learning-rate warm-up steps
    ema_decay: float = 0.0  # 0 disables EMA
    ema_start: int = 0
    log_every: int = 10
    sample_every: int = 0  # 0: only at the end
    ckpt_every: int = 0  # 0: only at the end
    seed: int = 0
    device: str = "cpu"
    amp: str = "none"  # none | bf16 (autocast; fp32 master weights)
    progress: bool = True
    threads: int = 0  # torch intra-op threads; 0 keeps torch's default


@dataclass
class SampleConfig:
    num_frames: int = 8
    steps: int = 20  # Euler steps per block for a multi-step (Stage 0/1) model
    guidance: float = 3.0  # CFG scale: v_u + g (v_c - v_u)
    prompts: list[str] = field(default_factory=lambda: ["a red circle moving right slow"])
    seed: int = 0
    fps: int = 8
    num_videos: int = 1


@dataclass
class RunConfig:
    name: str = "run"
    out_dir: str = "runs"
    stage: str = "stage1"  # a name in the stage registry (stages.py): stage0 | stage1 | ode | cd | dmd | ...
    tag: str = ""  # run sub-directory; default the stage name (a recipe can hold e.g. dmd_1step and dmd_2step)
    init: str = ""  # checkpoint directory to initialise the trained network from
    model: ModelConfig = field(default_factory=ModelConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    data: DataConfig = field(default_factory=DataConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    few_step: FewStepConfig = field(default_factory=FewStepConfig)
    ode: ODEConfig = field(default_factory=ODEConfig)
    cd: CDConfig = field(default_factory=CDConfig)
    dmd: DMDConfig = field(default_factory=DMDConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) / self.name / (self.tag or self.stage)


def model_preset(name: str, **overrides: Any) -> ModelConfig:
    if name not in MODEL_PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; choose one of {sorted(MODEL_PRESETS)}")
    return _build(ModelConfig, {"preset": name, **MODEL_PRESETS[name], **overrides}, "model")


# --- From plain data: strict for what users write, upgrading for what checkpoints stored ---


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            if k == "model" and "preset" in v:  # a preset replaces the model section, then its siblings apply
                out[k] = to_dict(model_preset(v["preset"]))
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def _refuse_moved(data: dict[str, Any]) -> None:
    """One clear error for a `distill:` section: say where each of its keys lives now."""
    old = data.get("distill")
    if old is None:
        return
    keys = sorted(old) if isinstance(old, dict) else []
    where = "; ".join(f"distill.{k} -> {' / '.join(MOVED[k])}" for k in keys if k in MOVED)
    raise ConfigError("config section 'distill' was split by method into few_step:, ode:, cd: and dmd:"
                      + (f" ({where})" if where else "") + "; move the keys there")


def from_dict(data: dict[str, Any], base: RunConfig | None = None) -> RunConfig:
    """Merge plain data over `base` (default: all defaults) and validate every key and type."""
    _refuse_moved(data)
    return _build(RunConfig, _merge(to_dict(base or RunConfig()), data), "")


def upgrade(data: dict[str, Any]) -> dict[str, Any]:
    """A config as an older framecast stored it (in a checkpoint or a run folder), in today's layout.

    `distill:` is split into its method sections and model keys added since keep their defaults, so old
    runs still load, resume and sample. What users write is never upgraded: `from_dict` refuses it.
    """
    data = copy.deepcopy(data)
    old = data.pop("distill", None)
    if isinstance(old, dict):
        for key, value in old.items():
            for dotted in MOVED.get(key, []):
                section, name = dotted.split(".")
                data.setdefault(section, {})[name] = value
    return data


def read_yaml(path: str | Path, what: str = "config") -> dict[str, Any]:
    """A YAML mapping from a file, or a one-line ConfigError naming the file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{what} file {str(p)!r} does not exist")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{what} file {str(p)!r} is not valid YAML: {e}".splitlines()[0]) from None
    if not isinstance(data, dict):
        raise ConfigError(f"{what} file {str(p)!r} must hold a mapping, got {type(data).__name__}")
    return data


def load(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """defaults -> YAML file -> overrides, each layer strict."""
    cfg = from_dict(read_yaml(path) if path is not None else {})
    for text in overrides:
        cfg = from_dict(parse_override(text), base=cfg)
    return cfg


def dump(cfg: RunConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


# --- Recipes: several stages sharing a base config ---


@dataclass
class Recipe:
    name: str
    stages: list[RunConfig]  # in order; each stage initialises from the previous one's checkpoint


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """A recipe YAML: `name`, `base` (a RunConfig mapping or a YAML path) and `stages` (name -> overrides).

    A stage's key is its run directory; its kind is the key itself or the `stage:` it sets. Every stage is validated strictly; command-line overrides apply to every stage.
    """
    p = Path(path)
    data = read_yaml(p, "recipe")
    unknown = sorted(set(data) - {"name", "base", "stages"})
    if unknown:
        raise ConfigError(f"unknown recipe key {unknown[0]!r} in {str(p)!r}; valid keys: base, name, stages")
    name = data.get("name", p.stem)
    stages = data.get("stages") or {}
    if not isinstance(stages, dict) or not stages:
        raise ConfigError(f"recipe {str(p)!r} needs a non-empty `stages` mapping (stage name -> overrides)")
    base_data = data.get("base") or {}
    if isinstance(base_data, str):  # a path to a run config YAML, relative to the recipe
        base_data = read_yaml(p.parent / base_data, "base config")
    base = from_dict({**base_data, "name": name})
    out = []
    for key, extra in stages.items():
        extra = dict(extra or {})
        kind = extra.pop("stage", key)  # `dmd_1step: {stage: dmd, ...}`: the key names the run, stage the kind
        cfg = from_dict({**extra, "stage": kind, "tag": key if key != kind else ""}, base=base)
        for text in overrides:
            cfg = from_dict(parse_override(text), base=cfg)
        out.append(cfg)
    return Recipe(name, out)
