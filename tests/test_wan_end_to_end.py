"""Real models in, real video out, on tiny random Wan2.1 checkpoints written in the layouts users hold
(tests/wan_tiny_full.py): every format samples the same video, `framecast sample` writes a playable mp4 of
1 + 4k frames, `--image` keeps the given first frame through encode/decode, `--video` continues a clip,
`framecast inspect` reads without loading and `framecast convert` writes a framecast checkpoint that samples
the same frames. Everything runs on the CPU in seconds."""

import imageio.v2 as imageio
import numpy as np
import pytest
import torch
from PIL import Image

from framecast.cli import main
from framecast.generate import load
from framecast.media import display_scale, read_image, write_video
from framecast.stream import Session

from .wan_tiny_full import write_tiny_cf, write_tiny_wan

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPT = "a cat on a mat"


@pytest.fixture(scope="module")
def tiny_wan(tmp_path_factory):
    root = tmp_path_factory.mktemp("wan")
    diff, orig, sd = write_tiny_wan(root)
    return {"diffusers": diff, "original": orig, "pt": write_tiny_cf(root / "cf" / "framewise-2step.pt", sd),
            "root": root}


def _video(path, base=None, **kw):
    m = load(path, base=base, **kw).at_size(32, 32)
    return m, m.decode(m.sample_latents([PROMPT], num_frames=3, seed=0))  # 3 latents -> 9 pixel frames


def test_every_format_samples_the_same_video(tiny_wan, tmp_path):
    _, ref = _video(tiny_wan["diffusers"], preset="framewise-2step")
    assert ref.shape == (1, 9, 3, 32, 32) and ref.abs().max() <= 1
    for path, base in ((tiny_wan["original"], None), (tiny_wan["pt"], tiny_wan["diffusers"]),
                       (tiny_wan["pt"], tiny_wan["original"])):
        m, video = _video(path, base, preset="framewise-2step")
        assert torch.equal(video, ref), (path, base)
    m, _ = _video(tiny_wan["pt"], tiny_wan["diffusers"])  # the preset from the release's file name
    assert m.info["preset"] == "framewise-2step" and m.info["key"] == "generator_ema" and m.spec.causal
    assert m.spec.first_sigmas is not None and len(m.spec.first_sigmas) == 4 and m.spec.guidance == 1.0
    assert main(["convert", str(tiny_wan["pt"]), "--base", str(tiny_wan["diffusers"]), "--out", str(tmp_path / "fc")]) == 0
    m, video = _video(tmp_path / "fc")  # the converted checkpoint: framecast format, VAE + umT5 by path
    assert m.info["format"] == "framecast" and torch.equal(video, ref)
    assert main(["convert", str(tiny_wan["pt"]), "--base", str(tiny_wan["diffusers"]), "--out", str(tmp_path / "fc")]) == 2


def test_sample_writes_a_playable_mp4_of_1_plus_4k_frames(tiny_wan, tmp_path, capsys):
    out = tmp_path / "clip.mp4"
    args = ["sample", "--model", str(tiny_wan["pt"]), "--base", str(tiny_wan["diffusers"]), "--prompt", PROMPT,
            "--height", "32", "--width", "32"]
    assert main([*args, "--frames", "13", "--out", str(out)]) == 0
    frames = imageio.mimread(str(out))
    side = 32 * display_scale(32, 32)  # tiny frames are upscaled to be seen; 480x832 ones are written as they are
    assert len(frames) == 13 and frames[0].shape[:2] == (side, side) and not (tmp_path / "clip.gif").exists()
    capsys.readouterr()
    assert main([*args, "--frames", "12", "--out", str(tmp_path / "bad.mp4")]) == 2  # not 1 + 4k
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "1 + 4k" in err and not (tmp_path / "bad.mp4").exists()
    assert main([*args[:-4], "--height", "36", "--width", "32", "--frames", "9", "--out", str(tmp_path / "b.mp4")]) == 2
    assert "36" in capsys.readouterr().err  # a size the VAE cannot divide: one line naming it


def test_image_to_video_keeps_the_first_frame_and_video_continues_a_clip(tiny_wan, tmp_path):
    rng = np.random.default_rng(0)
    img = tmp_path / "first.png"
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(img)
    base = ["--model", str(tiny_wan["pt"]), "--base", str(tiny_wan["diffusers"]), "--height", "32", "--width", "32",
            "--prompt", PROMPT]
    assert main(["sample", *base, "--image", str(img), "--frames", "9", "--out", str(tmp_path / "i2v"),
                 "--save-tensor"]) == 0
    video = torch.load(tmp_path / "i2v.pt", weights_only=True)  # [1, 9, 3, 32, 32]
    m = load(tiny_wan["pt"], base=tiny_wan["diffusers"]).at_size(32, 32)
    pixels = read_image(img, 32, 32)[None, None]
    kept = m.decode(m.codec.encode(pixels))[0, 0]  # the first frame through encode/decode
    assert video.shape == (1, 9, 3, 32, 32) and torch.equal(video[0, 0], kept)
    clip = tmp_path / "clip.mp4"
    write_video(video[0, :5], clip, fps=16, scale=1)  # 5 frames = 2 latents of context
    assert main(["sample", *base, "--video", str(clip), "--frames", "13", "--out", str(tmp_path / "cont"),
                 "--save-tensor"]) == 0
    cont = torch.load(tmp_path / "cont.pt", weights_only=True)
    assert cont.shape == (1, 13, 3, 32, 32)
    from framecast.media import read_video
    ctx = m.codec.encode(read_video(clip, 32, 32)[None])
    assert torch.equal(cont[0, :5], m.decode(ctx)[0])  # the given clip, through encode/decode, then new frames


def test_streaming_session_on_a_release_decodes_latent_by_latent(tiny_wan):
    s = Session.from_checkpoint(tiny_wan["pt"], base=tiny_wan["diffusers"], size=(32, 32), window=3)
    s.reset(PROMPT)
    shapes = [tuple(s.step().shape) for _ in range(4)]
    assert shapes == [(3, 32, 32), (4, 3, 32, 32), (4, 3, 32, 32), (4, 3, 32, 32)]  # 1 frame, then 4 per latent
    s.switch_prompt("a dog")
    assert s.step().shape == (4, 3, 32, 32) and s.cached_frames <= 3


def test_inspect_reads_without_loading(tiny_wan, capsys, monkeypatch):
    import framecast.models.wan as W

    def no_load(*a, **kw):
        assert kw.get("mmap") and kw.get("weights_only"), "inspect must not read tensor data"
        return real(*a, **kw)

    real = torch.load
    monkeypatch.setattr(W.torch, "load", no_load)
    assert main(["inspect", str(tiny_wan["pt"])]) == 0
    out = capsys.readouterr().out
    assert "official" in out and "generator_ema" in out and "framewise-2step" in out
    assert main(["inspect", str(tiny_wan["original"])]) == 0
    out = capsys.readouterr().out
    assert "original" in out and "vae" in out and "text_encoder" in out


def test_a_session_on_the_static_cache_streams_the_same_frames(tiny_wan):
    """The opt-in preallocated ring-buffer cache (StaticKVCache) gives a release the same stream as the default
    cache, over enough frames that its ring wraps."""
    kw = dict(base=tiny_wan["diffusers"], size=(32, 32), window=3, sink=1, seed=5)
    a, b = Session.from_checkpoint(tiny_wan["pt"], **kw), Session.from_checkpoint(tiny_wan["pt"], static=True, **kw)
    for s in (a, b):
        s.reset(PROMPT)
    for _ in range(7):
        assert torch.equal(a.step(), b.step())
    assert type(b.cache).__name__ == "StaticKVCache" and a.cached_frames == b.cached_frames
