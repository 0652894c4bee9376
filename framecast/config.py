"""Typed configuration: dataclasses with one home for every default, named presets, YAML, strict overrides.

A run is described by one `RunConfig`. It is built in three layers, each strict (an unknown key, a value of
the wrong type or outside its field's rule, e.g. `steps: int = POSITIVE(100)`, is a `ConfigError` naming the key):

    defaults (this file)  ->  YAML recipe (`configs/*.yaml`)  ->  command-line `a.b=c` overrides

`model.preset` names a size preset (`tiny`, `toy`, `wan2.1-1.3b`, `wan2.1-14b`); keys next to it override it.
The resolved config is written into every run and checkpoint (architecture.md §5).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .config_upgrade import MOVED, refuse_moved, upgrade  # noqa: F401  (re-exported)
from .errors import ConfigError
from .schema import (DECAY, DEVICE_NAME, FINITE, FINITE_NON_NEGATIVE, FINITE_POSITIVE, NON_NEGATIVE, POSITIVE,
                     PROBABILITY, SEED, STEP_LIST, STEP_LIST_OR_EMPTY, device_problem, folder_problem, one_of,
                     parse_override, read_yaml, to_dict, build as _build)

__all__ = ["ConfigError", "RunConfig", "from_dict", "load", "load_recipe", "parse_override", "to_dict", "upgrade"]


@dataclass
class ModelConfig:
    """The one transformer. Field names follow diffusers' `WanTransformer3DModel` arguments."""

    preset: str = "tiny"
    patch_size: tuple[int, int, int] = POSITIVE((1, 4, 4))  # (t, h, w); Wan2.1 uses (1, 2, 2) on VAE latents
    num_heads: int = POSITIVE(2)
    head_dim: int = POSITIVE(16)
    in_channels: int = POSITIVE(3)
    out_channels: int = POSITIVE(3)
    text_dim: int = POSITIVE(32)
    freq_dim: int = POSITIVE(32)  # sinusoidal time-embedding width
    ffn_dim: int = POSITIVE(64)
    num_layers: int = POSITIVE(2)
    cross_attn_norm: bool = True
    eps: float = FINITE_POSITIVE(1e-6)
    rope_max_seq_len: int = POSITIVE(1024)  # only sizes the stock RoPE table; our RoPE is computed from positions
    num_actions: int = NON_NEGATIVE(0)  # > 0 adds a zero-initialised per-frame action embedder (world models)
    action_init_std: float = FINITE_NON_NEGATIVE(0.0)  # > 0: action rows start as N(0, std^2) (world_model.md)
    spatial_embed: bool = False  # + a zero-initialised (row, column) embedding per token (docs/world_model.md)
    action_tokens: int = NON_NEGATIVE(0)  # T > 0: + a zero-init embedding per (action, token of T per frame)
    attention_backend: str = one_of("sdpa", "flex")  # sdpa: dense boolean mask (CPU, training); flex: CUDA opt-in
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

    shift: float = FINITE_POSITIVE(5.0)
    num_train_timesteps: int = POSITIVE(1000)  # the grid training sigmas are drawn from
    weighting: str = one_of("bell", "uniform")  # bell (Stage-1 "bsmntw" weight, method.md §2) | uniform


@dataclass
class DataConfig:
    # episodes: recorded by `framecast record`; store: a video/prompt store written by `framecast prepare`
    name: str = one_of("shapes", "vectors", "episodes", "store")
    path: str = ""  # episodes and store: the folder
    num_frames: int = POSITIVE(8)
    height: int = POSITIVE(32)
    width: int = POSITIVE(32)
    seed: int = SEED(0)
    length: int = POSITIVE(100_000)  # virtual dataset size; samples are generated on demand
    text_encoder: str = one_of("hash", "minilm", "umt5")
    text_encoder_source: str = ""  # the text encoder's weights and tokenizer (umt5: a folder or .pth)
    text_tokens: int = POSITIVE(16)
    # vectors only: frames are `dim`-vectors from a Gaussian mixture (data/vectors.py)
    vector_dim: int = POSITIVE(2)
    vector_components: int = POSITIVE(2)
    vector_std: float = FINITE_POSITIVE(0.05)


@dataclass
class ObjectiveConfig:
    name: str = "diffusion"
    # diffusion: bidirectional (Stage 0) | teacher_forcing (Stage 1, TF) | diffusion_forcing (Stage 1, DF)
    mode: str = one_of("", "bidirectional", "teacher_forcing", "diffusion_forcing")  # "": the stage's own (stages.py)
    block_size: int = POSITIVE(1)  # K latent frames per AR block (1 frame-wise, 3 chunk-wise)
    window: int = NON_NEGATIVE(0)  # attention window in frames, counting the current block; 0 = unbounded
    sink: int = NON_NEGATIVE(0)  # frames at the start that stay visible when a window is set
    text_dropout: float = PROBABILITY(0.1)  # caption dropout: the model also learns the unconditional velocity
    motion_weight: float = FINITE_NON_NEGATIVE(0.0)  # > 0: moving elements weigh 1 + this (docs/world_model.md)
    motion_threshold: float = FINITE_NON_NEGATIVE(0.1)  # "moving": |change from the previous frame| > this


@dataclass
class FewStepConfig:
    """The schedule of a few-step generator (stages ode, cd, dmd; method.md §2, §7.6). Step lists use the reference
    configs' warped convention (method.md §12.3): [1000, 500] means sigmas shift(1.0), shift(0.5) = 1, .8333 at 5."""

    denoising_steps: list[int] = STEP_LIST([1000, 750, 500, 250])
    first_block_steps: list[int] = STEP_LIST_OR_EMPTY([])  # the first block's own schedule; [] = the same


@dataclass
class ODEConfig:
    """Stage 2a, causal ODE initialisation (method.md §5). Checkpoint paths accept `@<stage>` in a recipe."""

    teacher: str = ""  # the Stage-1 AR teacher (the Stage-0 base for the bidirectional baseline)
    teacher_kind: str = one_of("causal", "bidirectional")  # causal: AR, clean GT context; bidirectional: SF baseline
    grid_steps: int = POSITIVE(48)  # N of the teacher's Euler grid; few-step sigmas lie on it (method.md §5.1)
    guidance: float = FINITE(3.0)  # teacher CFG; the reference uses 6 for ODE and 3 for CD (method.md §12.2)
    num_pairs: int = POSITIVE(256)  # ODE trajectories to generate
    shard_size: int = POSITIVE(64)  # trajectories per shard of the pair store
    pairs_dir: str = ""  # where the pair store lives; default <run dir>/pairs
    pair_mode: str = one_of("cached", "packed")  # cached: block-wise, KV cache; packed: teacher-forcing forward


@dataclass
class CDConfig:
    """Stage 2b, causal consistency distillation (Causal Forcing++, method.md §6)."""

    teacher: str = ""  # the Stage-1 AR teacher
    grid_steps: int = POSITIVE(48)  # N of the consistency grid; the few-step sigmas must lie on it
    guidance: float = FINITE(3.0)  # teacher CFG of the online Euler step
    target_decay: float = DECAY(0.99)  # EMA target network of the student (method.md §6)
    boundary_pair: bool = False  # also train sigma_{N-1} -> 0, anchored on the teacher (method.md §12.5; ablation)


@dataclass
class DMDConfig:
    """Stage 3, asymmetric DMD with self-rollout (method.md §7)."""

    real: str = ""  # the real score, frozen: the bidirectional base (method.md §7.1), or with score_kind causal the
    critic: str = ""  # AR teacher; the fake score's initialisation, of the same kind (docs/distillation.md, dmd)
    score_kind: str = one_of("bidirectional", "causal")  # causal: both scores see the rollout as clean context
    real_guidance: float = FINITE(4.0)  # u + g (c - u); the reference's x_c + 3 (x_c - x_u) is g = 4 (method.md §12.1)
    critic_ratio: int = POSITIVE(5)  # critic updates per generator update (method.md §7.5)
    critic_lr: float = FINITE_NON_NEGATIVE(4.0e-7)
    critic_betas: tuple[float, float] = DECAY((0.0, 0.999))
    sigma_min: float = PROBABILITY(0.02)  # noise: shift(U{0..999}/1000) clamped to [min, max] (method.md §7.3)
    sigma_max: float = PROBABILITY(0.98)
    context_sigma: float = PROBABILITY(0.0)  # noise of the committed context in self-rollout (0: clean, method.md §12.8)


@dataclass
class TrainConfig:
    steps: int = POSITIVE(100)
    batch_size: int = POSITIVE(4)
    grad_accum: int = POSITIVE(1)
    lr: float = FINITE_NON_NEGATIVE(1e-4)
    betas: tuple[float, float] = DECAY((0.9, 0.999))
    weight_decay: float = FINITE_NON_NEGATIVE(0.01)
    grad_clip: float = FINITE_NON_NEGATIVE(10.0)  # 0: no clipping
    warmup: int = NON_NEGATIVE(0)  # linear learning-rate warm-up steps
    lr_schedule: str = one_of("constant", "cosine")  # after warm-up: constant, or cosine decay to lr * lr_final
    lr_final: float = PROBABILITY(0.0)  # cosine only: the last step's learning rate as a fraction of lr
    lr_hold: int = NON_NEGATIVE(0)  # cosine only: steps at the full rate after warm-up, before the decay starts
    ema_decay: float = DECAY(0.0)  # 0 disables EMA
    ema_start: int = NON_NEGATIVE(0)
    log_every: int = NON_NEGATIVE(10)  # 0 acts as 1
    sample_every: int = NON_NEGATIVE(0)  # 0: only at the end
    ckpt_every: int = NON_NEGATIVE(0)  # 0: only at the end
    seed: int = SEED(0)
    device: str = DEVICE_NAME("cpu")  # must exist on this machine when a run is loaded
    amp: str = one_of("none", "bf16")  # none | bf16 (autocast; fp32 master weights)
    progress: bool = True
    threads: int = NON_NEGATIVE(0)  # torch intra-op threads; 0 keeps torch's default


@dataclass
class DistConfig:
    """Many processes under torchrun (docs/scaling.md): FSDP2 over an explicit device mesh. Ignored in one process.
    train.batch_size is per rank and micro-batch; the global batch is batch_size x grad_accum x world size."""

    mixed_precision: str = one_of("none", "bf16")  # bf16: bf16 parameters in compute, fp32 reduce, fp32 master
    reshard_after_forward: bool = True  # free gathered parameters after each block's forward (ZeRO-3)
    shard_group: int = NON_NEGATIVE(0)  # 0: shard over all ranks; N: shard within groups of N, replicate across


@dataclass
class SampleConfig:
    num_frames: int = POSITIVE(8)
    steps: int = POSITIVE(20)  # Euler steps per block for a multi-step (Stage 0/1) model
    guidance: float = FINITE(3.0)  # CFG scale: v_u + g (v_c - v_u)
    prompts: list[str] = field(default_factory=lambda: ["a red circle moving right slow"])
    seed: int = SEED(0)
    fps: int = POSITIVE(8)
    num_videos: int = POSITIVE(1)


@dataclass
class RunConfig:
    name: str = "run"
    out_dir: str = "runs"
    stage: str = "stage1"  # a name in the stage registry (stages.py): stage0 | stage1 | ode | cd | dmd | ...
    tag: str = ""  # run sub-directory; default the stage name (a recipe can hold e.g. dmd_1step and dmd_2step)
    init: str = ""  # checkpoint directory to initialise the trained network from
    use: str = ""  # recipes: this stage is not trained but is this existing checkpoint (a path, pretrained:<name>)
    model: ModelConfig = field(default_factory=ModelConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    data: DataConfig = field(default_factory=DataConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    few_step: FewStepConfig = field(default_factory=FewStepConfig)
    ode: ODEConfig = field(default_factory=ODEConfig)
    cd: CDConfig = field(default_factory=CDConfig)
    dmd: DMDConfig = field(default_factory=DMDConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dist: DistConfig = field(default_factory=DistConfig)
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
            v = _merge(out[k], v)
        out[k] = v
    return out


def from_dict(data: dict[str, Any], base: RunConfig | None = None) -> RunConfig:
    """Merge plain data over `base` (default: all defaults) and validate every key, type and value rule."""
    refuse_moved(data)
    return _build(RunConfig, _merge(to_dict(base or RunConfig()), data), "")


def _check_run(cfg: RunConfig) -> None:
    """What a run about to start needs, checked before a recipe trains any stage (never asked of a stored config):
    its device and out_dir on this machine, step lists within flow.num_train_timesteps, a cosine with steps to decay."""
    fs, T, t = cfg.few_step, cfg.flow.num_train_timesteps, cfg.train
    over = next((k for k in ("denoising_steps", "first_block_steps") if max(getattr(fs, k), default=0) > T), None)
    no_decay = t.lr_schedule == "cosine" and t.lr_hold > 0 and t.warmup + t.lr_hold >= t.steps - 1
    for key, value, problem in (("train.device", cfg.train.device, device_problem(cfg.train.device)),
                                ("out_dir", cfg.out_dir, folder_problem(cfg.out_dir)),
                                (f"few_step.{over}", getattr(fs, over or "denoising_steps"),
                                 over and f"values must be <= flow.num_train_timesteps ({T})"),
                                ("train.lr_hold", t.lr_hold, no_decay and f"with train.warmup ({t.warmup}) it leaves "
                                 f"no step of train.steps ({t.steps}) for the cosine decay")):
        if problem:
            raise ConfigError(f"config key {key!r} is {value!r}: {problem}")


def load(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """defaults -> YAML file -> overrides, each layer strict; then what the run needs from this machine."""
    cfg = from_dict(read_yaml(path) if path is not None else {})
    for text in overrides:
        cfg = from_dict(parse_override(text), base=cfg)
    _check_run(cfg)
    return cfg


def dump(cfg: RunConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


# --- Recipes: several stages sharing a base config ---

@dataclass
class Recipe:
    name: str
    stages: list[RunConfig]  # in order; each stage initialises from the previous one's checkpoint


def _recipe_data(p: Path, seen: tuple[Path, ...] = ()) -> tuple[dict[str, Any], dict[str, Any], str]:
    """A recipe file's (base, stages, name) with `extends` resolved: this file's `base` and each of its `stages`
    merged over the parent's (same key), new stages after the parent's (docs/distillation.md)."""
    if p.resolve() in seen:
        raise ConfigError(f"recipe {str(p)!r} extends itself (through {' -> '.join(map(str, seen))})")
    data = read_yaml(p, "recipe")
    unknown = sorted(set(data) - {"name", "base", "stages", "extends"})
    if unknown:
        raise ConfigError(f"unknown recipe key {unknown[0]!r} in {str(p)!r}; valid keys: base, extends, name, stages")
    stages = data.get("stages") or {}
    if not isinstance(stages, dict) or (not stages and "extends" not in data):
        raise ConfigError(f"recipe {str(p)!r} needs a non-empty `stages` mapping (stage name -> overrides)")
    base_data = data.get("base") or {}
    if isinstance(base_data, str):  # a path to a run config YAML, relative to the recipe
        base_data = read_yaml(p.parent / base_data, "base config")
    if not isinstance(base_data, dict):
        raise ConfigError(f"recipe {str(p)!r}: `base` must be a mapping or a YAML path, got {base_data!r}")
    name = data.get("name", p.stem)
    if "extends" not in data:
        return base_data, stages, name
    if not isinstance(parent := data["extends"], str):
        raise ConfigError(f"recipe {str(p)!r}: `extends` must be a recipe YAML path, got {parent!r}")
    parent_base, parent_stages, _ = _recipe_data(p.parent / parent, seen + (p.resolve(),))
    merged = dict(parent_stages)
    for key, extra in stages.items():
        if not isinstance(extra, (dict, type(None))):
            raise ConfigError(f"recipe {str(p)!r}: stage {key!r}: {extra!r} is not a name mapped to overrides")
        merged[key] = _merge(dict(merged.get(key) or {}), dict(extra or {}))
    return _merge(parent_base, base_data), merged, name


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """A recipe YAML: `name`, `base` (a RunConfig mapping or a YAML path), `stages` (name -> overrides) and
    optionally `extends` (a parent recipe, see _recipe_data). A stage's key is its run directory, its kind the
    key itself or the `stage:` it sets; every stage is validated strictly (no repeated keys either) and the
    command-line overrides apply to every stage."""
    p = Path(path)
    base_data, stages, name = _recipe_data(p)
    base = from_dict({**base_data, "name": name})
    out = []
    for key, extra in stages.items():
        if not isinstance(key, str) or not isinstance(extra, (dict, type(None))):  # YAML reads `1:` as an int
            raise ConfigError(f"recipe {str(p)!r}: stage {key!r}: {extra!r} is not a name mapped to overrides")
        extra = dict(extra or {})
        kind = extra.pop("stage", key)  # `dmd_1step: {stage: dmd, ...}`: the key names the run, stage the kind
        cfg = from_dict({**extra, "stage": kind, "tag": key if key != kind else ""}, base=base)
        for text in overrides:
            cfg = from_dict(parse_override(text), base=cfg)
        _check_run(cfg)
        out.append(cfg)
    return Recipe(name, out)
