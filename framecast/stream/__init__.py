"""Streaming sessions: one live, stateful stream over a causal model (architecture.md §4, issue: world model, point 5).

    from framecast.stream import Session
    s = Session.from_checkpoint("runs/quickstart/dmd_2step", window=8)
    s.reset(prompt="a red circle moving right slow")
    frame = s.step()                    # [C, H, W] in [-1, 1]: the next frame (block_size frames for chunk models)
    s.switch_prompt("a blue square moving up fast")   # applies from the next frame on
    frame = s.step(action=2)            # world models: actions[f] leads to frame f

Every frame goes through the one `rollout` loop with the session's KV cache, so a session produces exactly
the frames `pipeline.sample` produces for the same noise (tests/test_stream.py). With a `window` the
cache keeps at most `window` frames (plus `sink`), so memory stays flat however long the session runs.
Servers and CLIs talk to this class only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .. import flow
from ..models.conditioning import Cond
from ..models.denoiser import Guidance
from ..rollout import rollout
from ..sampling import SAMPLERS

Tensor = torch.Tensor


class SessionError(RuntimeError):
    """A request the session cannot serve (stepping before reset, a bad action, a wrong frame shape)."""


class Session:
    def __init__(self, model, meta: dict[str, Any], *, text_encoder=None, window: int | None = None,
                 sink: int | None = None, seed: int = 0) -> None:
        if not meta.get("causal"):
            raise SessionError("a streaming session needs a causal (frame-wise or chunk-wise AR) model; this checkpoint "
                               "is bidirectional")
        self.model, self.meta, self.text_encoder = model.eval(), meta, text_encoder
        # noise is drawn on the CPU from the session's generator (the same frames on any device), then moved
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.block_size = int(meta["block_size"])
        self.window = meta["window"] if window is None else window
        self.sink = meta["sink"] if sink is None else sink
        self.frame_shape = tuple(meta["frame_shape"])
        self.seed = seed
        few = meta.get("few_step", False)
        self.sampler = SAMPLERS["few_step" if few else "euler"]
        if few:
            self.sigmas = torch.tensor(meta["sigmas"])
            self.first_sigmas = torch.tensor(meta["first_sigmas"]) if meta.get("first_sigmas") else None
        else:
            self.sigmas, self.first_sigmas = flow.grid(meta["steps"], meta["shift"]).float(), None
        self.guidance_scale = float(meta["guidance"])
        action_embed = getattr(model, "action_embed", None)
        self.num_actions = action_embed.num_actions if action_embed is not None else 0
        self.cache = None

    @classmethod
    def from_checkpoint(cls, path: str | Path, *, device: str = "cpu", **kw) -> Session:
        from ..pipeline import load_model, text_encoder_for

        model, meta, cfg = load_model(path, device=device)
        sm = meta["sampling"]
        enc = text_encoder_for(cfg, sm)
        return cls(model, sm, text_encoder=enc, **kw)

    # -- lifecycle --------------------------------------------------------------------------------

    def reset(self, prompt: str = "", first_frame: Tensor | None = None, seed: int | None = None) -> None:
        """Start a new stream: a fresh cache, the prompt, and optionally a clean first frame [C, H, W] as context
        (image-to-video / a world model's observed start)."""
        self.cache = self.model.new_cache(block_size=self.block_size, window=self.window, sink=self.sink)
        self.generator = torch.Generator().manual_seed(self.seed if seed is None else seed)
        self.generated = 0
        self.switch_prompt(prompt)
        if first_frame is not None:
            if tuple(first_frame.shape) != self.frame_shape:
                raise SessionError(f"first frame has shape {tuple(first_frame.shape)}, the model makes "
                                   f"{self.frame_shape}")
            ctx = first_frame[None, None].to(self.device, self.dtype)  # [1, 1, C, H, W]
            list(rollout(self.model, ctx[:, :0], self._cond(None, 1), sampler=self.sampler, sigmas=self.sigmas,
                         block_size=self.block_size, context=ctx, cache=self.cache, guidance=self._guidance(1)))

    def switch_prompt(self, prompt: str) -> None:
        """Condition the following frames on `prompt` (the frames already cached keep theirs)."""
        if self.text_encoder is None:
            raise SessionError("this session has no text encoder (build it with Session.from_checkpoint)")
        self.text = self.text_encoder.encode([prompt]).to(self.device, self.dtype)
        self.null_text = self.text_encoder.encode([""]).to(self.device, self.dtype)
        self.prompt = prompt

    @torch.no_grad()
    def step(self, action: int | None = None, noise: Tensor | None = None) -> Tensor:
        """Generate the next block and commit it: [C, H, W] for a frame-wise model, [K, C, H, W] for chunks."""
        if self.cache is None:
            raise SessionError("call reset() before step()")
        K = self.block_size
        if noise is None:
            noise = torch.randn((1, K, *self.frame_shape), generator=self.generator)
        noise = noise.to(self.device, self.dtype)
        if tuple(noise.shape) != (1, K, *self.frame_shape):
            raise SessionError(f"noise must be {(1, K, *self.frame_shape)}, got {tuple(noise.shape)}")
        first = self.first_sigmas if self.generated == 0 and self.cache.end == 0 else None
        (blk,) = rollout(self.model, noise, self._cond(action, K), sampler=self.sampler, sigmas=self.sigmas,
                         first_sigmas=first, block_size=K, cache=self.cache, guidance=self._guidance(K),
                         commit_last=True, generator=self.generator)
        self.generated += K
        out = blk.x0[0]  # [K, C, H, W]
        return out[0] if K == 1 else out

    # -- helpers ----------------------------------------------------------------------------------

    def _cond(self, action: int | None, frames: int) -> Cond:
        """Text plus, for world models, actions indexed by absolute frame up to the block's end."""
        if self.num_actions == 0:
            if action is not None:
                raise SessionError("this model takes no actions (model.num_actions = 0)")
            return Cond(self.text)
        if action is not None and not (isinstance(action, int) and 0 <= action < self.num_actions):
            raise SessionError(f"action must be an int in [0, {self.num_actions}), got {action!r}")
        null = self.num_actions
        acts = torch.full((1, self.cache.end + frames), null, dtype=torch.long, device=self.device)  # earlier: unread
        acts[:, -frames:] = null if action is None else action
        return Cond(self.text, acts)

    def _guidance(self, frames: int) -> Guidance | None:
        if self.guidance_scale == 1.0:
            return None
        acts = (None if self.num_actions == 0  # indexed by absolute frame, like _cond's (rollout slices both)
                else torch.full((1, self.cache.end + frames), self.num_actions, dtype=torch.long, device=self.device))
        return Guidance(self.guidance_scale, Cond(self.null_text, acts))

    @property
    def cached_frames(self) -> int:
        return 0 if self.cache is None else self.cache.num_frames
