"""framecast.stream.Session: a live stream equals the batch sampler for the same noise (decoded through the same
codec), a first pixel frame is encoded and committed like the sampler's context, memory stays bounded with a
window, actions and prompt switches reach the next frame, bad requests get named errors."""

from pathlib import Path

import pytest
import torch

from framecast import config as C
from framecast import generate
from framecast.errors import RequestError
from framecast.generate import build_denoiser
from framecast.models.codecs import IdentityCodec
from framecast.stages import normalise, sampling_spec
from framecast.stream import Session, SessionError
from framecast.train import checkpoint as ckpt

from .conftest import randomise

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
FEW = ["stage=dmd", "few_step.denoising_steps=[1000,500]", "few_step.first_block_steps=[1000,750,500,250]"]


class PassThrough(IdentityCodec):
    """The identity codec without its clamp: the session's raw latents, to compare them unclamped too."""

    def decode(self, latents):
        return latents


def setup(root: Path, *overrides, num_actions=0) -> generate.LoadedModel:
    """A checkpoint of the tiny model with random weights under `root`, loaded back with generate.load."""
    cfg = normalise(C.load(TINY, list(overrides) + ([f"model.num_actions={num_actions}"] if num_actions else [])))
    model = randomise(build_denoiser(cfg.model)).eval()
    meta = {"stage": cfg.stage, "config": C.to_dict(cfg), "sampling": sampling_spec(cfg).to_json()}
    path = ckpt.save(root / "ckpt", 1, weights={"model": model.state_dict()}, meta=meta)
    return generate.load(path)


def session(m: generate.LoadedModel, **kw) -> Session:
    return Session(m.denoiser, m.spec, **({"text_encoder": m.text_encoder, "codec": m.codec} | kw))


@pytest.mark.parametrize("overrides", [FEW, ["stage=stage1"]], ids=["few_step_2", "euler_cfg"])
def test_session_equals_the_batch_sampler(overrides, one_thread, tmp_path):
    m = setup(tmp_path, *overrides)
    F, prompt = 5, "a red circle moving right slow"
    g = torch.Generator().manual_seed(3)  # generate.sample draws its noise first, then re-noises from the same g
    noise = torch.randn(1, F, *m.spec.latent_shape, generator=g)
    state = g.get_state()
    cond, null = m.encode_prompts([prompt])
    ref = generate.sample(m.denoiser, m.spec, cond, null, num_frames=F, seed=3)  # latents [1, F, C, H, W]
    assert ref.shape == (1, F, *m.spec.latent_shape)
    for s, want in ((Session.from_checkpoint(m.path), m.decode(ref)[0]),  # pixels through the checkpoint's codec
                    (session(m, codec=PassThrough(m.spec.latent_shape[0])), ref[0])):  # and unclamped
        s.reset(prompt)
        s.generator.set_state(state)  # the same stream of re-noising draws as the batch run
        frames = torch.stack([s.step(noise=noise[:, f:f + 1]) for f in range(F)])
        torch.testing.assert_close(frames, want, rtol=1e-5, atol=1e-5)
    assert frames.abs().max() > 1  # random weights leave [-1, 1]: the decoded comparison did see the clamp


def test_first_pixel_frame_is_the_samplers_context(one_thread, tmp_path):
    """reset(first_frame=pixels) encodes the frame through the codec and commits it like `context=` of the
    batch sampler (Euler + CFG: one schedule for every block)."""
    m = setup(tmp_path, "stage=stage1")
    F, prompt = 3, "a blue square moving up fast"
    first = torch.rand(*m.spec.pixel_shape, generator=torch.Generator().manual_seed(5)) * 2 - 1
    g = torch.Generator().manual_seed(4)
    noise = torch.randn(1, F, *m.spec.latent_shape, generator=g)
    state = g.get_state()
    cond, null = m.encode_prompts([prompt])
    ctx = m.codec.encode(first[None, None])
    ref = generate.sample(m.denoiser, m.spec, cond, null, num_frames=F, seed=4, context=ctx)
    s = session(m)
    s.reset(prompt, first_frame=first)
    s.generator.set_state(state)
    frames = torch.stack([s.step(noise=noise[:, f:f + 1]) for f in range(F)])
    torch.testing.assert_close(frames, m.decode(ref)[0], rtol=1e-5, atol=1e-5)
    assert s.cached_frames == 1 + F


def test_window_keeps_memory_flat(one_thread, tmp_path):
    m = setup(tmp_path, *FEW)
    s = session(m, window=3, sink=1)
    s.reset("a blue square moving up fast")
    sizes = []
    for _ in range(12):
        s.step()
        sizes.append(s.cache.k[0].shape[1])
    assert s.cached_frames == 3 and max(sizes) == sizes[-1]  # sink + (window - 1) recent frames, never more
    assert s.generated == 12


def test_actions_and_prompt_switch_reach_the_next_frame(one_thread, tmp_path):
    m = setup(tmp_path, *FEW, num_actions=3)
    s = session(m)
    noise = torch.randn(1, 1, *m.spec.latent_shape, generator=torch.Generator().manual_seed(0))
    outs = {}
    for a in (0, 2, None):
        s.reset("a red circle moving right slow")
        s.step(noise=noise)
        outs[a] = s.step(action=a, noise=noise)
    assert not torch.allclose(outs[0], outs[2]) and not torch.allclose(outs[0], outs[None])
    s.reset("a red circle moving right slow")
    s.step(noise=noise)
    s.switch_prompt("a green triangle moving left fast")
    switched = s.step(noise=noise)
    assert not torch.allclose(switched, outs[None]) and s.prompt.startswith("a green")
    with pytest.raises(SessionError, match=r"action must be an int in \[0, 3\)"):
        s.step(action=3)
    with pytest.raises(SessionError, match="action must be"):
        s.step(action="left")


def test_first_frame_context_and_bad_requests(one_thread, tmp_path):
    m = setup(tmp_path / "few", *FEW)
    spec = m.spec
    s = session(m)
    assert issubclass(SessionError, RequestError)  # servers and the CLI catch the user-error type
    with pytest.raises(SessionError, match="reset"):
        s.step()
    with pytest.raises(SessionError, match="takes no actions"):
        s.reset("x") or s.step(action=1)
    with pytest.raises(SessionError, match="first frame has shape"):
        s.reset("x", first_frame=torch.zeros(3, 8, 8))
    first = torch.rand(*spec.pixel_shape) * 2 - 1
    s.reset("a red circle moving right slow", first_frame=first)
    assert s.cached_frames == 1
    out = s.step()
    assert s.cached_frames == 2 and out.shape == tuple(spec.pixel_shape)
    assert out.min() >= -1 and out.max() <= 1  # decoded pixels (the identity codec clamps)
    with pytest.raises(SessionError, match="noise must be"):
        s.step(noise=torch.zeros(1, 2, *spec.latent_shape))
    with pytest.raises(SessionError, match="no text encoder"):
        Session(m.denoiser, spec).reset("x")
    bidir = setup(tmp_path / "bidir", "stage=stage0")
    with pytest.raises(SessionError, match="causal"):
        session(bidir)
