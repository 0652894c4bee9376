"""Streaming sessions: one live, stateful stream over a causal model (architecture.md §4).

    from framecast.stream import Session
    s = Session.from_checkpoint("runs/quickstart/dmd_2step", window=8)
    s.reset(prompt="a red circle moving right slow")
    frame = s.step()                    # [C, H, W] pixels in [-1, 1]: the next frame ([f, C, H, W] for chunks)
    s.switch_prompt("a blue square moving up fast")   # applies from the next frame on
    frame = s.step(action=2)            # world models: actions[f] leads to frame f

Every block goes through the one `rollout` loop with the session's KV cache and the schedule its
`SamplingSpec` gives (`spec.schedule()`), so a session generates exactly the latents `generate.sample`
generates for the same noise (tests/test_stream.py). The session works in latent frames of
`spec.latent_shape` and talks pixels at its edges: a first frame given to `reset` is a pixel frame of
`spec.pixel_shape`, encoded through the codec before it is committed as context, and `step` returns pixel
frames decoded through a streaming decoder of the codec, one per stream (the one decode point of the
session path). With a `window` the cache keeps at most `window` latent frames (plus `sink`), so memory
stays flat however long the session runs. Servers and CLIs talk to this class only.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import RequestError
from ..models.codecs import Codec, build_codec
from ..models.conditioning import Cond
from ..models.denoiser import Guidance
from ..rollout import rollout
from ..sampling import SAMPLERS
from ..spec import SamplingSpec

Tensor = torch.Tensor


class SessionError(RequestError):
    """A request the session cannot serve (stepping before reset, a bad action, a wrong frame shape)."""


class Session:
    def __init__(self, model, spec: SamplingSpec, *, text_encoder=None, codec: Codec | None = None,
                 window: int | None = None, sink: int | None = None, seed: int = 0, static: bool = False) -> None:
        """`static`: a preallocated ring-buffer KV cache (models/kv_cache.StaticKVCache: the same frames, static
        shapes for torch.compile / CUDA graphs); it needs a window."""
        if not spec.causal:
            raise SessionError("a streaming session needs a causal (frame-wise or chunk-wise AR) model; this "
                               "checkpoint is bidirectional")
        self.model, self.spec, self.text_encoder = model.eval(), spec, text_encoder
        self.codec = codec if codec is not None else build_codec(spec.codec, spec.latent_shape[0])
        # noise is drawn on the CPU from the session's generator (the same frames on any device), then moved
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.block_size = int(spec.block_size)
        self.window = spec.window if window is None else window
        self.sink = spec.sink if sink is None else sink
        self.latent_shape, self.pixel_shape = tuple(spec.latent_shape), tuple(spec.pixel_shape)
        self.seed = seed
        if static and not self.window:
            raise SessionError("a static KV cache needs a window (window=...)")
        self.static = static
        sched = spec.schedule()
        self.sampler, self.sigmas, self.first_sigmas = SAMPLERS[sched.sampler], sched.sigmas, sched.first_sigmas
        self.guidance_scale = float(spec.guidance)
        action_embed = getattr(model, "action_embed", None)
        self.num_actions = action_embed.num_actions if action_embed is not None else 0
        self.cache = self.decoder = None

    @classmethod
    def from_checkpoint(cls, path: str | Path, *, device: str = "cpu", base: str | Path | None = None,
                        preset: str | None = None, size: tuple[int, int] | None = None, **kw) -> Session:
        """A session on any model `generate.load` reads (a Wan .pt needs `base`), at `size` (height, width)."""
        from ..generate import load

        m = load(path, device=device, base=base, preset=preset)
        m = m.at_size(*size) if size else m
        return cls(m.denoiser, m.spec, **({"text_encoder": m.text_encoder, "codec": m.codec} | kw))

    # -- lifecycle --------------------------------------------------------------------------------

    def reset(self, prompt: str = "", first_frame: Tensor | None = None, seed: int | None = None) -> None:
        """Start a new stream: a fresh cache and decoder, the prompt, and optionally a clean first PIXEL frame
        [C, H, W] of `spec.pixel_shape` as context (image-to-video / a world model's observed start)."""
        if first_frame is not None and tuple(first_frame.shape) != self.pixel_shape:
            raise SessionError(f"first frame has shape {tuple(first_frame.shape)}, the model makes "
                               f"{self.pixel_shape}")
        kw = {"static": True} if self.static else {}  # analytic test models take no `static`
        self.cache = self.model.new_cache(block_size=self.block_size, window=self.window, sink=self.sink, **kw)
        self.decoder = self.codec.decoder()
        self.generator = torch.Generator().manual_seed(self.seed if seed is None else seed)
        self.generated = 0
        self.switch_prompt(prompt)
        if first_frame is not None:
            with torch.no_grad():
                ctx = self.codec.encode(first_frame[None, None].to(self.device, self.dtype))  # [1, f, C', H', W']
                self.decoder.step(ctx)  # a causal decoder's state follows the whole latent stream, context included
                n = ctx.shape[1]
                list(rollout(self.model, ctx[:, :0], self._cond(None, n), sampler=self.sampler, sigmas=self.sigmas,
                             block_size=self.block_size, context=ctx, cache=self.cache, guidance=self._guidance(n)))

    def switch_prompt(self, prompt: str) -> None:
        """Condition the following frames on `prompt` (the frames already cached keep theirs)."""
        if self.text_encoder is None:
            raise SessionError("this session has no text encoder (build it with Session.from_checkpoint)")
        self.text = self.text_encoder.encode([prompt]).to(self.device, self.dtype)
        self.null_text = self.text_encoder.encode([self.spec.negative_prompt]).to(self.device, self.dtype)
        self.prompt = prompt

    @torch.no_grad()
    def step(self, action: int | None = None, noise: Tensor | None = None) -> Tensor:
        """Generate the next block, commit it and return its pixels: [C, H, W] for a frame-wise model whose
        codec decodes one pixel frame per latent frame, else [f, C, H, W]. `noise`: latent noise
        [1, K, *spec.latent_shape] (default: drawn from the session's generator)."""
        if self.cache is None:
            raise SessionError("call reset() before step()")
        K = self.block_size
        if noise is None:
            noise = torch.randn((1, K, *self.latent_shape), generator=self.generator)
        noise = noise.to(self.device, self.dtype)
        if tuple(noise.shape) != (1, K, *self.latent_shape):
            raise SessionError(f"noise must be {(1, K, *self.latent_shape)}, got {tuple(noise.shape)}")
        first = self.first_sigmas if self.generated == 0 and self.cache.end == 0 else None
        (blk,) = rollout(self.model, noise, self._cond(action, K), sampler=self.sampler, sigmas=self.sigmas,
                         first_sigmas=first, block_size=K, cache=self.cache, guidance=self._guidance(K),
                         commit_last=True, generator=self.generator)
        self.generated += K
        out = self.decoder.step(blk.x0)[0]  # [f, C, H, W] pixels
        return out[0] if K == 1 and out.shape[0] == 1 else out

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
