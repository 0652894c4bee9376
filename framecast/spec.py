"""SamplingSpec: how a checkpoint samples, as one frozen, typed record saved (JSON) in every checkpoint.

Everything a sampler, a streaming session, the play server or a benchmark needs to sample a model the way
it was trained lives here, and nothing reads a string-keyed dict any more:

* the generator: causal or not (`mode`), block size K (None: one block spanning the clip), window + sink;
* the schedule: `sampler` (`euler` for multi-step models, `few_step` for distilled generators), the exact
  few-step `sigmas` and the first block's own `first_sigmas` (method.md §2, §7.6), or the Euler step
  count and `shift`; CFG `guidance` (1.0: none; distilled generators sample without CFG);
* shapes: `latent_shape` [C, H, W] of one latent frame, `pixel_shape` of one decoded frame, and the
  `codec` between them; `num_frames` latent frames per training clip; the text encoder and its length.

`schedule()` is the one place that turns a spec (plus user overrides) into a sampler name and sigmas: the
"few-step -> stored sigmas, else an Euler grid" rule, with the refusal to sample a model with the other
kind of sampler unless forced (architecture.md §5).
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass
from typing import Any

import torch

from . import flow
from .errors import CheckpointError, ConfigError
from .schema import FINITE, FINITE_POSITIVE, NON_NEGATIVE, POSITIVE, Rule, coerce

MODES = ("bidirectional", "teacher_forcing", "diffusion_forcing")
SAMPLER_NAMES = ("euler", "few_step")
FEW_STEP_FIELDS = ("sigmas", "first_sigmas", "denoising_steps", "first_block_steps")
SIGMA = Rule("a noise level in (0, 1]", lambda v: FINITE.ok(v) and 0 < v <= 1)
FIELD_RULES = {"block_size": POSITIVE, "num_frames": POSITIVE, "latent_shape": POSITIVE, "pixel_shape": POSITIVE,
               "steps": POSITIVE, "shift": FINITE_POSITIVE, "guidance": FINITE, "window": NON_NEGATIVE,
               "sink": NON_NEGATIVE, "sigmas": SIGMA, "first_sigmas": SIGMA, "denoising_steps": POSITIVE,
               "first_block_steps": POSITIVE, "text_tokens": POSITIVE}  # checked when a stored spec is read


def few_step_fields(denoising_steps, first_block_steps=(), shift: float = 5.0,
                    num_train_timesteps: int = 1000) -> dict[str, Any]:
    """The few-step fields of a SamplingSpec from warped step lists (method.md §2, §7.6): exact sigmas, the
    first block's own (None: the same), the lists themselves and the step count. Stages and release presets
    both build their specs through it."""
    first = tuple(first_block_steps)
    return dict(sampler="few_step", steps=len(denoising_steps), denoising_steps=tuple(denoising_steps),
                first_block_steps=first,
                sigmas=tuple(flow.few_step_sigmas(denoising_steps, shift, num_train_timesteps=num_train_timesteps)
                              .tolist()),
                first_sigmas=tuple(flow.few_step_sigmas(first, shift, num_train_timesteps=num_train_timesteps)
                                   .tolist()) if first else None)


@dataclass(frozen=True)
class Schedule:
    sampler: str  # a key of sampling.SAMPLERS
    sigmas: torch.Tensor  # [S] (euler: ends at 0; few_step: no trailing 0)
    first_sigmas: torch.Tensor | None  # the first generated block's own schedule, or None


@dataclass(frozen=True)
class SamplingSpec:
    mode: str
    block_size: int | None
    num_frames: int
    latent_shape: tuple[int, int, int]
    pixel_shape: tuple[int, int, int]
    codec: str = "identity"
    sampler: str = "euler"
    steps: int = 20  # Euler steps per block of a multi-step model
    shift: float = 5.0
    guidance: float = 1.0
    window: int = 0
    sink: int = 0
    sigmas: tuple[float, ...] | None = None
    first_sigmas: tuple[float, ...] | None = None
    denoising_steps: tuple[int, ...] = ()
    first_block_steps: tuple[int, ...] = ()
    text_encoder: str = "hash"
    text_tokens: int = 16
    negative_prompt: str = ""  # the null branch of CFG (Wan's own runs use a long negative prompt)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"sampling mode {self.mode!r} is not one of {MODES}")
        if self.sampler not in SAMPLER_NAMES:
            raise ConfigError(f"sampler {self.sampler!r} is not one of {SAMPLER_NAMES}")
        if self.sampler == "few_step" and not self.sigmas:
            raise ConfigError("a few-step sampling spec needs its sigmas")
        if self.causal and (self.block_size is None or self.block_size < 1):
            raise ConfigError(f"a causal model needs block_size >= 1, got {self.block_size}")

    # -- what it is ------------------------------------------------------------------------------

    @property
    def causal(self) -> bool:
        return self.mode != "bidirectional"

    @property
    def few_step(self) -> bool:
        return self.sampler == "few_step"

    @property
    def nfe(self) -> int:
        """Network evaluations per block (CFG counts twice): what one generated block costs."""
        if self.few_step:
            return len(self.sigmas or ())
        return self.steps * (2 if self.guidance != 1.0 else 1)

    def block(self, num_frames: int) -> int:
        """Frames per generated block: K for causal models, the whole clip for a bidirectional one."""
        return int(self.block_size) if self.causal else num_frames

    def at_size(self, pixel_shape: tuple[int, int, int], latent_shape: tuple[int, int, int]) -> SamplingSpec:
        """The same model sampled at another frame size (the codec derives the latent shape)."""
        return self.replace(pixel_shape=tuple(pixel_shape), latent_shape=tuple(latent_shape))

    def stream_window(self, override: int | None = None) -> int:
        """The KV-cache window of a live stream (play, world metrics): `override`, else the trained window,
        else the training clip length, since a causal model never saw frame offsets beyond it."""
        return int(override) if override is not None else int(self.window or self.num_frames)

    def describe(self) -> str:
        if self.few_step:
            first = len(self.first_sigmas or self.sigmas or ())
            return f"{len(self.sigmas or ())}-step few-step sampler (first frame {first} steps), no CFG"
        return f"{self.steps} Euler steps per frame with CFG {self.guidance:g}"

    # -- the one schedule rule -------------------------------------------------------------------

    def schedule(self, *, sampler: str | None = None, steps: int | None = None,
                 denoising_steps: list[int] | None = None, force: bool = False) -> Schedule:
        """Sampler and sigmas for this model; `sampler`/`steps`/`denoising_steps` override the stored ones.

        Asking a multi-step model for few-step sampling (or the reverse) raises unless `force`.
        """
        name = sampler or self.sampler
        if name not in SAMPLER_NAMES:
            raise ConfigError(f"unknown sampler {name!r}; choose one of {sorted(SAMPLER_NAMES)}")
        if (name == "few_step") != self.few_step and not force:
            kind = "a few-step generator" if self.few_step else "a multi-step (Euler) model"
            raise ConfigError(f"this checkpoint is {kind} (mode {self.mode}); sampling it with {name!r} would not "
                              f"give its distribution; pass force=True (--force) to do it anyway")
        if name == "euler":
            return Schedule(name, flow.grid(steps or self.steps, self.shift).float(), None)
        first = torch.tensor(self.first_sigmas) if self.first_sigmas else None  # trained with it
        if denoising_steps:
            sigmas = flow.few_step_sigmas(denoising_steps, self.shift).float()
        elif self.sigmas:
            sigmas = torch.tensor(self.sigmas)
        else:
            raise ConfigError("this checkpoint has no few-step schedule; give denoising_steps")
        return Schedule(name, sigmas, first)

    # -- JSON ------------------------------------------------------------------------------------

    def replace(self, **changes: Any) -> SamplingSpec:
        return dataclasses.replace(self, **changes)

    def to_json(self) -> dict[str, Any]:
        """Plain JSON; `causal`, `few_step` and `nfe` are added for readers of meta.json (ignored on load),
        and the few-step fields are left out of a multi-step model's spec."""
        d = dataclasses.asdict(self)
        if not self.few_step:
            for key in FEW_STEP_FIELDS:
                d.pop(key)
        d.update(causal=self.causal, few_step=self.few_step, nfe=self.nfe)
        return json.loads(json.dumps(d))  # tuples -> lists

    @classmethod
    def from_json(cls, data: Any, where: str = "checkpoint") -> SamplingSpec:
        """Read a stored spec; the sampling dicts of older checkpoints (`frame_shape`, `few_step`) too."""
        if not isinstance(data, dict):
            found = "no `sampling` entry" if data is None else f"`sampling` is a {type(data).__name__}"
            raise CheckpointError(f"{where} has no sampling spec ({found})")
        d = dict(data)
        if "frame_shape" in d:  # written before latent and pixel shapes were kept apart (identity codec)
            d["latent_shape"] = d["pixel_shape"] = d.pop("frame_shape")
        for legacy in ("causal", "few_step", "nfe"):  # derived, written for readers
            d.pop(legacy, None)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise CheckpointError(f"{where}: unknown sampling field {unknown[0]!r} (a newer framecast wrote it?)")
        hints = typing.get_type_hints(cls)
        try:
            for key, value in d.items():  # every field of its type and within its rule (schema.py)
                d[key] = coerce(value, hints[key], key)
                if key in FIELD_RULES and d[key] is not None:
                    FIELD_RULES[key].check(d[key], key)
            return cls(**d)
        except (TypeError, ConfigError) as e:
            raise CheckpointError(f"{where} holds an unusable sampling spec ({e})") from None
