"""Typed configuration: dataclasses with one home for every default, named presets, YAML, strict overrides.

A run is described by one `RunConfig`. It is built in three layers, each strict (an unknown key or a
value of the wrong type is a `ConfigError` naming the key):

    defaults (this file)  ->  YAML recipe (`configs/*.yaml`)  ->  command-line `a.b=c` overrides

`model.preset` names a size preset (`tiny`, `toy`, `wan2.1-1.3b`, `wan2.1-14b`); keys given next to it
in the same mapping override the preset's values. The resolved config is written into every run
directory and every checkpoint, so a checkpoint is self-describing (architecture.md §5).
"""

from __future__ import annotations

import contextlib
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config key or value that cannot be used; the message names the key."""


# ------------------------------------------------------------------------------------------------
# Schemas
# ------------------------------------------------------------------------------------------------


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
    text_encoder: str = "hash"  # hash | minilm
    text_tokens: int = 16
    # vectors only: frames are `dim`-vectors from a Gaussian mixture (data/vectors.py)
    vector_dim: int = 2
    vector_components: int = 2
    vector_std: float = 0.05


@dataclass
class ObjectiveConfig:
    name: str = "diffusion"
    # diffusion: bidirectional (Stage 0) | teacher_forcing (Stage 1, TF) | diffusion_forcing (Stage 1, DF)
    mode: str = "teacher_forcing"
    block_size: int = 1  # K latent frames per AR block (1 frame-wise, 3 chunk-wise)
    window: int = 0  # attention window in frames, counting the current block; 0 = unbounded
    sink: int = 0  # frames at the start that stay visible when a window is set
    text_dropout: float = 0.1  # caption dropout so the model also learns the unconditional velocity (CFG)


@dataclass
class DistillConfig:
    """Stages 2-3 (method.md §5-§7): few-step schedules, teachers and the knobs of ODE, CD and DMD.

    Step lists use the reference configs' warped convention (method.md §12.3): [1000, 500] means sigmas
    shift(1.0), shift(0.5) = 1, .8333 at shift 5. Teacher/real/critic are checkpoint paths; in a recipe
    `@<stage>` names another stage of the same recipe, and `framecast pipeline` fills the usual ones.
    """

    denoising_steps: list[int] = field(default_factory=lambda: [1000, 750, 500, 250])  # few-step schedule
    first_block_steps: list[int] = field(default_factory=list)  # first block's own schedule (method.md §7.6); [] = same
    grid_steps: int = 48  # N of the ODE/CD grid; the few-step sigmas must lie on it (method.md §5.1, §6)
    teacher: str = ""  # ODE/CD teacher checkpoint: the Stage-1 AR model (the Stage-0 base for the baseline)
    guidance: float = 3.0  # teacher CFG for ODE pairs and CD. The reference uses 6 (ODE) and 3 (CD), so its
    # two inits distill different flows (method.md §12.2); one value here makes them target the same flow map
    ode_teacher: str = "causal"  # causal (AR teacher, clean GT context) | bidirectional (Self Forcing baseline)
    num_pairs: int = 256  # ODE trajectories to generate
    shard_size: int = 64  # trajectories per shard of the pair store
    pairs_dir: str = ""  # where the pair store lives; default <run dir>/pairs
    pair_mode: str = "cached"  # cached (block-wise with the KV cache) | packed (teacher-forcing forward)
    target_decay: float = 0.99  # CD target network (EMA of the student, method.md §6)
    real: str = ""  # DMD real score: the bidirectional base, frozen
    critic: str = ""  # DMD fake score initialisation: the bidirectional base (method.md §7.1)
    real_guidance: float = 4.0  # u + g (c - u); the reference's x_c + 3 (x_c - x_u) is g = 4 (method.md §12.1)
    critic_ratio: int = 5  # critic updates per generator update (method.md §7.5)
    critic_lr: float = 4.0e-7
    critic_betas: tuple[float, float] = (0.0, 0.999)
    dmd_sigma_min: float = 0.02  # DMD noise levels: shift(U{0..999}/1000) clamped to [min, max] (method.md §7.3)
    dmd_sigma_max: float = 0.98
    context_sigma: float = 0.0  # noise level of the committed context in self-rollout (0: clean, method.md §12.8)


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
    stage: str = "stage1"  # stage0 | stage1 | ode | cd | dmd
    tag: str = ""  # run sub-directory; default the stage name (a recipe can hold e.g. dmd_1step and dmd_2step)
    init: str = ""  # checkpoint directory to initialise the trained network from
    model: ModelConfig = field(default_factory=ModelConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    data: DataConfig = field(default_factory=DataConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) / self.name / (self.tag or self.stage)


def model_preset(name: str, **overrides: Any) -> ModelConfig:
    if name not in MODEL_PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; choose one of {sorted(MODEL_PRESETS)}")
    return _build(ModelConfig, {"preset": name, **MODEL_PRESETS[name], **overrides}, "model")


# ------------------------------------------------------------------------------------------------
# Strict construction from plain data
# ------------------------------------------------------------------------------------------------


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotated type `tp`; convert only lossless cases (int->float, list->tuple)."""
    origin = typing.get_origin(tp)
    if tp is float:
        if isinstance(value, str):  # PyYAML (YAML 1.1) reads `1e-4` without a dot as a string
            with contextlib.suppress(ValueError):
                value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key {key!r} expects a float, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key {key!r} expects an int, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key {key!r} expects true/false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key {key!r} expects a string, got {value!r}")
        return value
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"config key {key!r} expects a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, key) for v, a in zip(value, args))
    if origin is list:
        (arg,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key {key!r} expects a list, got {value!r}")
        return [_coerce(v, arg, key) for v in value]
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"config key {key!r} got {value!r}, which matches none of {tp}")
    raise ConfigError(f"config key {key!r} has an unsupported type {tp}")  # pragma: no cover


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"config section {prefix!r} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f" in section {prefix!r}" if prefix else ""
        raise ConfigError(f"unknown config key {'.'.join(filter(None, [prefix, unknown[0]]))!r}{where}; "
                          f"valid keys: {sorted(names)}")
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        tp = hints[name]
        kwargs[name] = _build(tp, value, key) if dataclasses.is_dataclass(tp) else _coerce(value, tp, key)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain-data form (tuples become lists) for YAML/JSON."""

    def plain(v: Any) -> Any:
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(cfg))


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


def from_dict(data: dict[str, Any], base: RunConfig | None = None) -> RunConfig:
    """Merge plain data over `base` (default: all defaults) and validate every key and type."""
    return _build(RunConfig, _merge(to_dict(base or RunConfig()), data), "")


def parse_override(text: str) -> dict[str, Any]:
    """`train.lr=3e-4` -> {"train": {"lr": 3e-4}}. Values are parsed as YAML scalars/lists."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key=value (e.g. train.lr=3e-4)")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key")
    value = yaml.safe_load(raw) if raw.strip() else ""
    out: dict[str, Any] = {}
    node = out
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


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


# ------------------------------------------------------------------------------------------------
# Recipes: several stages sharing a base config
# ------------------------------------------------------------------------------------------------


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
