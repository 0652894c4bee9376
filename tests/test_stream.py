"""framecast.stream.Session: a live stream equals the batch sampler for the same noise, memory stays bounded
with a window, actions and prompt switches reach the next frame, bad requests get named errors."""

from pathlib import Path

import pytest
import torch

from framecast import config as C
from framecast import flow
from framecast.models.conditioning import Cond, build_text_encoder
from framecast.models.denoiser import Guidance
from framecast.pipeline import build_denoiser, sampling_meta
from framecast.rollout import generate
from framecast.sampling import SAMPLERS
from framecast.stream import Session, SessionError

from .conftest import randomise

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
FEW = ["stage=dmd", "distill.denoising_steps=[1000,500]", "distill.first_block_steps=[1000,750,500,250]"]


def setup(*overrides, num_actions=0):
    cfg = C.load(TINY, list(overrides) + ([f"model.num_actions={num_actions}"] if num_actions else []))
    model = randomise(build_denoiser(cfg.model)).eval()
    enc = build_text_encoder("hash", cfg.model.text_dim, cfg.data.text_tokens, 0)
    return model, sampling_meta(cfg), enc


@pytest.mark.parametrize("overrides", [FEW, ["stage=stage1"]], ids=["few_step_2", "euler_cfg"])
def test_session_equals_the_batch_sampler(overrides, one_thread):
    model, meta, enc = setup(*overrides)
    F, prompt = 5, "a red circle moving right slow"
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(1, F, *meta["frame_shape"], generator=g)
    state = g.get_state()
    few = meta["few_step"]
    sig = torch.tensor(meta["sigmas"]) if few else flow.grid(meta["steps"], meta["shift"]).float()
    guid = None if meta["guidance"] == 1.0 else Guidance(meta["guidance"], Cond(enc.encode([""])))
    with torch.no_grad():
        ref = generate(model, noise, Cond(enc.encode([prompt])), sampler=SAMPLERS[meta["sampler"]], sigmas=sig,
                       first_sigmas=torch.tensor(meta["first_sigmas"]) if few else None, block_size=1,
                       guidance=guid, generator=g)
    s = Session(model, meta, text_encoder=enc)
    s.reset(prompt)
    s.generator.set_state(state)  # the same stream of re-noising draws as the batch run
    frames = torch.stack([s.step(noise=noise[:, f:f + 1]) for f in range(F)])
    torch.testing.assert_close(frames, ref[0], rtol=1e-5, atol=1e-5)


def test_window_keeps_memory_flat(one_thread):
    model, meta, enc = setup(*FEW)
    s = Session(model, meta, text_encoder=enc, window=3, sink=1)
    s.reset("a blue square moving up fast")
    sizes = []
    for _ in range(12):
        s.step()
        sizes.append(s.cache.k[0].shape[1])
    assert s.cached_frames == 3 and max(sizes) == sizes[-1]  # sink + (window - 1) recent frames, never more
    assert s.generated == 12


def test_actions_and_prompt_switch_reach_the_next_frame(one_thread):
    model, meta, enc = setup(*FEW, num_actions=3)
    s = Session(model, meta, text_encoder=enc)
    noise = torch.randn(1, 1, *meta["frame_shape"], generator=torch.Generator().manual_seed(0))
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


def test_first_frame_context_and_bad_requests(one_thread):
    model, meta, enc = setup(*FEW)
    s = Session(model, meta, text_encoder=enc)
    with pytest.raises(SessionError, match="reset"):
        s.step()
    with pytest.raises(SessionError, match="takes no actions"):
        s.reset("x") or s.step(action=1)
    with pytest.raises(SessionError, match="first frame has shape"):
        s.reset("x", first_frame=torch.zeros(3, 8, 8))
    first = torch.rand(*meta["frame_shape"]) * 2 - 1
    s.reset("a red circle moving right slow", first_frame=first)
    assert s.cached_frames == 1 and s.step().shape == tuple(meta["frame_shape"])
    with pytest.raises(SessionError, match="noise must be"):
        s.step(noise=torch.zeros(1, 2, *meta["frame_shape"]))
    bidir, bmeta, _ = setup("stage=stage0")
    with pytest.raises(SessionError, match="causal"):
        Session(bidir, bmeta, text_encoder=enc)
