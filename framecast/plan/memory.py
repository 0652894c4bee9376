"""The planner's arithmetic (docs/scaling.md §1-§3): the networks a stage holds, their exact per-rank bytes under
FSDP2's dim-0 chunk rule, the modelled in-flight gathers and the activation estimate. The API is framecast.plan."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple

import torch

from .. import config as C
from .. import stages as S
from ..errors import ConfigError
from ..generate import build_denoiser
from ..models.codecs import shape_codec

GIB = 2 ** 30
HEADROOM = 0.10  # of GPU memory left free: the CUDA context, NCCL buffers, allocator fragmentation
FP32, BF16 = torch.float32.itemsize, torch.bfloat16.itemsize
# models/transformer.py `_blocks` also checkpoints the self-rollout's cached exit forwards (they commit nothing
# and read a snapshot of the cache, models/kv_snapshot.py): only block inputs stay (tests/test_plan.py checks it)
CHECKPOINTED_CACHED_FORWARDS = True
# What a Wan block (transformer `_block`) saves for its backward, per token, counted from its forward: D-wide
# tensors in the compute dtype (the modulated norms' outputs, q/k/v before and after their RMS norms, the
# attention kernel's q/k/v/out, the gated branches, cross-attention's query side, the FFN input), D-wide fp32
# ones (the fp32 norm inputs and statistics' products, RoPE's complex q/k, the gated FFN output) and the FFN's
# two hidden-wide tensors (the GELU's input and output). A memory-efficient kernel keeps no attention matrix.
SAVED_COMPUTE, SAVED_FP32, SAVED_HIDDEN = 16, 11, 2
HEAD_COMPUTE, HEAD_FP32 = 1, 2  # the adaLN head over every token: its fp32 norm input and output, proj_out's input
WORKING_COMPUTE, WORKING_FP32 = 2, 2  # live in a no-grad block besides the FFN's hidden-wide pair
MODE_KIND = {"bidirectional": "bidirectional", "teacher_forcing": "packed", "diffusion_forcing": "causal"}
KEEP = ("gradient_checkpointing", "attention_backend", "codec", "codec_source", "num_actions")  # how, not what size


@dataclass(frozen=True)
class Forward:
    """One forward of a training step, for the activation estimate."""

    net: str  # "model", a role (teacher, real, critic) or a copy (target)
    grad: bool
    kind: str  # packed ([clean ; noisy]: 2x the tokens) | causal | bidirectional | rollout (per block, KV cache)
    guidance: float = 1.0  # CFG != 1 runs the conditional and null branches as one doubled batch


@dataclass(frozen=True)
class Profile:
    """What a stage's objective holds and runs beyond its registry record (objectives/*.py); tests/test_plan.py
    checks it against the objectives the stages really build."""

    trained: tuple[str, ...] = ()  # roles trained with their own AdamW
    copies: tuple[str, ...] = ()  # networks the objective copies from the student
    ema: tuple[str, ...] | None = None  # trained networks that keep an EMA (Objective.ema_roles); None: all
    forwards: Callable[[C.RunConfig], list[Forward]] | None = None  # None: one grad forward in the stage's mode


def _dmd_kind(c: C.RunConfig) -> str:
    return "packed" if c.dmd.score_kind == "causal" else "bidirectional"  # causal scores: [clean rollout ; noisy]


PROFILES: dict[str, Profile] = {
    "ode": Profile(forwards=lambda c: [Forward("model", True, "packed" if c.ode.teacher_kind == "causal" else "causal")]),
    "cd": Profile(copies=("target",), forwards=lambda c: [  # method.md §6: student, teacher Euler step, target
        Forward("model", True, "packed"), Forward("teacher", False, "packed", c.cd.guidance),
        Forward("target", False, "packed")]),
    "dmd": Profile(trained=("critic",), ema=("model",), forwards=lambda c: [  # method.md §7: in a generator step
        Forward("model", True, "rollout"), Forward("real", False, _dmd_kind(c), c.dmd.real_guidance),  # both
        Forward("critic", False, _dmd_kind(c)), Forward("critic", True, _dmd_kind(c))]),  # graphs live
}


def register_profile(stage: str, profile: Profile) -> None:
    """A method registered in stages.py whose objective trains or keeps more than its model declares it here."""
    PROFILES[stage] = profile


# --- exact: parameter shapes and FSDP2's chunk rule ---


def shard_numel(shape: tuple[int, ...], world: int, rank: int = 0) -> int:
    """Elements of `rank`'s shard of a parameter of `shape`: chunk `rank` of torch.chunk(param, world, dim=0)."""
    rows, rest = (shape[0], math.prod(shape[1:])) if shape else (1, 1)
    size = -(-rows // world)  # torch.chunk's chunk length, ceil(rows / world); the last chunks are shorter or absent
    return max(0, min(size, rows - rank * size)) * rest


def rank_numel(shapes, world: int, rank: int = 0) -> int:
    return sum(shard_numel(tuple(s), world, rank) for s in shapes)


@dataclass(frozen=True)
class Layout:
    """A network's tensors, from a meta-device build of its model config."""

    params: tuple[tuple[int, ...], ...]  # parameter shapes
    state: tuple[tuple[int, ...], ...]  # state_dict shapes (what an EMA shadows)
    units: tuple[int, ...]  # parameters of each FSDP2 unit: one per transformer block, then the root

    @property
    def count(self) -> int:
        return sum(self.units)


_LAYOUTS: dict[str, Layout] = {}


def layout(mc: C.ModelConfig) -> Layout:
    key = json.dumps(C.to_dict(mc), sort_keys=True)
    if key not in _LAYOUTS:
        d = build_denoiser(mc, "meta")
        blocks = list(getattr(d.net, "blocks", []))
        inside = {id(p) for b in blocks for p in b.parameters()}
        units = [sum(p.numel() for p in b.parameters()) for b in blocks]
        units.append(sum(p.numel() for p in d.parameters() if id(p) not in inside))
        _LAYOUTS[key] = Layout(tuple(tuple(p.shape) for p in d.parameters()),
                               tuple(tuple(v.shape) for v in d.state_dict().values()), tuple(units))
    return _LAYOUTS[key]


class Net(NamedTuple):
    name: str  # model | a role name | a copy name
    kind: str  # trained | frozen | copy
    model: C.ModelConfig
    ema: bool = False


def role_model(cfg: C.RunConfig, key: str, roles: dict[str, str]) -> C.ModelConfig:
    """The model config of role `key` (e.g. dmd.real): `roles[key]`, a preset name or a Wan folder / framecast
    checkpoint (its config is read, no weights), run as the stage runs its model; else the stage's own."""
    want = roles.get(key)
    if not want:
        return cfg.model
    own = {k: getattr(cfg.model, k) for k in KEEP}
    if want in C.MODEL_PRESETS:
        mc = C.model_preset(want, **own)
    elif Path(want).exists():
        from ..models import wan

        mc = wan.model_config(want, **own)
    else:
        raise ConfigError(f"--role {key}={want}: not a model preset ({', '.join(sorted(C.MODEL_PRESETS))}) and no "
                          f"such Wan folder or framecast checkpoint")
    if (mc.in_channels, mc.text_dim) != (cfg.model.in_channels, cfg.model.text_dim):
        raise ConfigError(f"--role {key}={want} has in_channels/text_dim {mc.in_channels}/{mc.text_dim}, the stage's "
                          f"model {cfg.model.in_channels}/{cfg.model.text_dim}")
    return mc


def networks(cfg: C.RunConfig, roles: dict[str, str]) -> list[Net]:
    """Every network stage `cfg` holds while it trains."""
    st, prof = S.get(cfg.stage), PROFILES.get(cfg.stage, Profile())
    names = {r.key.split(".")[1]: r.key for r in st.roles}
    if set(prof.trained) - set(names):
        raise ValueError(f"profile of {cfg.stage!r} trains {sorted(set(prof.trained) - set(names))}, not its roles")
    trained = {"model", *prof.trained}
    ema = (trained if prof.ema is None else set(prof.ema)) if cfg.train.ema_decay > 0 else set()
    nets = [Net("model", "trained", cfg.model, "model" in ema)]
    nets += [Net(n, "trained" if n in trained else "frozen", role_model(cfg, k, roles), n in ema) for n, k in names.items()]
    return nets + [Net(c, "copy", cfg.model) for c in prof.copies]


def static_bytes(nets: list[Net], world: int, mixed: bool, rank: int = 0) -> dict[str, int]:
    """The exact resident bytes of `rank` (rank 0: the most loaded) by kind."""
    out = dict.fromkeys(("params", "grads", "optim", "ema", "frozen"), 0)
    for n in nets:
        lay = layout(n.model)
        p = rank_numel(lay.params, world, rank)
        if n.kind == "trained":
            out["params"] += p * FP32
            out["grads"] += p * FP32
            out["optim"] += 2 * p * FP32 + len(lay.params) * FP32  # exp_avg, exp_avg_sq; a 0-d fp32 `step` each
        else:  # a copy follows the student's fp32 master (CD's target is its EMA); frozen ones compute only
            out["frozen"] += p * (FP32 if n.kind == "copy" or not mixed else BF16)
        if n.ema:
            out["ema"] += rank_numel(lay.state, world, rank) * FP32
    return out


def gathered_bytes(nets: list[Net], compute: int, reshard: bool) -> int:
    """FSDP2's unsharded parameters and gradients in flight (modelled; one network computes at a time)."""
    unit = {n.name: max(layout(n.model).units) for n in nets}
    trained = [n for n in nets if n.kind == "trained"]
    params = max(2 * unit[n.name] * compute for n in nets)
    grad = max(unit[n.name] for n in trained) * (compute + (FP32 if compute != FP32 else 0))
    kept = 0 if reshard else sum(layout(n.model).count * compute for n in trained)
    return params + grad + kept


# --- estimate: activations of one micro-batch ---


def geometry(cfg: C.RunConfig) -> tuple[int, int]:
    """(token frames, tokens per frame) of one training video: data.* (pixels) through the codec and the patch."""
    codec = shape_codec(cfg.model.codec, cfg.model.in_channels, cfg.model.codec_source)
    frames = codec.latent_frames(cfg.data.num_frames)
    _, h, w = codec.latent_shape((codec.pixel_channels, cfg.data.height, cfg.data.width))
    pt, ph, pw = cfg.model.patch_size
    if frames % pt or h % ph or w % pw:
        raise ConfigError(f"{cfg.data.num_frames} frames of {cfg.data.height}x{cfg.data.width} px give {frames} "
                          f"latent frames of {h}x{w}, not divisible by model.patch_size {list(cfg.model.patch_size)}")
    return frames // pt, (h // ph) * (w // pw)


def block_bytes(mc: C.ModelConfig, tokens: int, a: int) -> int:
    """What one block saves for its backward over `tokens` tokens (batch included), compute dtype of `a` bytes."""
    return tokens * ((SAVED_COMPUTE * a + SAVED_FP32 * FP32) * mc.dim + SAVED_HIDDEN * a * mc.ffn_dim)


def _rollout_bytes(mc: C.ModelConfig, cfg: C.RunConfig, frames: int, per_frame: int, batch: int, a: int) -> int:
    """The self-rollout (method.md §7.2): every block's exit forward keeps its graph, whose attention saved the
    block's keys and values with the cached context; the KV cache holds every committed frame."""
    K, win = cfg.objective.block_size, cfg.objective.window
    ends = [min(s + K, frames) for s in range(0, frames, K)]
    seen = sum(min(e, win + cfg.objective.sink) if win else e for e in ends)  # frames each exit forward attends
    kv = 2 * mc.dim * a * mc.num_layers * batch * per_frame  # K and V, all layers, per frame
    cache = kv * (min(frames, win + cfg.objective.sink) if win else frames)
    if CHECKPOINTED_CACHED_FORWARDS and mc.gradient_checkpointing:
        return mc.num_layers * batch * frames * per_frame * mc.dim * a + cache
    return mc.num_layers * block_bytes(mc, batch * frames * per_frame, a) + kv * seen + cache


def working_bytes(mc: C.ModelConfig, tokens: int, a: int) -> int:
    """A no-grad forward's peak inside one block: the residual stream (compute dtype and fp32), the FFN input and
    its two hidden-wide tensors."""
    return tokens * ((WORKING_COMPUTE * a + WORKING_FP32 * FP32) * mc.dim + SAVED_HIDDEN * a * mc.ffn_dim)


class Activations(NamedTuple):
    """The activation estimate of one micro-batch, in bytes."""

    stored: int  # the graphs of every grad forward, all alive at once (as in DMD's generator step)
    transient: int  # the larger of one block's internals live again in a backward and a no-grad forward's peak
    mask: int  # the dense boolean SDPA mask of a causal cache-less forward (flex: a negligible block mask)

    @property
    def total(self) -> int:
        return self.stored + self.transient + self.mask


def activation_estimate(cfg: C.RunConfig, nets: list[Net], a: int) -> Activations:
    """Estimated activations of stage `cfg`'s micro-batch (train.batch_size videos) in a compute dtype of `a` bytes."""
    prof = PROFILES.get(cfg.stage, Profile())
    forwards = prof.forwards(cfg) if prof.forwards else [Forward("model", True, MODE_KIND[S.mode_of(cfg)])]
    model = {n.name: n.model for n in nets}
    frames, per_frame = geometry(cfg)
    stored = peak = mask = 0
    for f in forwards:
        mc, batch = model[f.net], cfg.train.batch_size * (2 if f.guidance != 1.0 else 1)
        tokens = frames * per_frame * (2 if f.kind == "packed" else 1)
        if f.kind in ("packed", "causal") and mc.attention_backend == "sdpa":
            mask = max(mask, tokens * tokens)
        if not f.grad:
            peak = max(peak, working_bytes(mc, batch * tokens, a))
        elif f.kind == "rollout":
            stored += _rollout_bytes(mc, cfg, frames, per_frame, batch, a)
            peak = max(peak, block_bytes(mc, batch * per_frame * cfg.objective.block_size, a))
        else:
            stored += batch * tokens * mc.dim * (HEAD_COMPUTE * a + HEAD_FP32 * FP32) + mc.num_layers * (
                batch * tokens * mc.dim * a if mc.gradient_checkpointing else block_bytes(mc, batch * tokens, a))
            peak = max(peak, block_bytes(mc, batch * tokens, a))
    return Activations(stored, peak, mask)
