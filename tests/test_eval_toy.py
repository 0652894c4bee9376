"""Toy video metrics (framecast/eval/toy.py, eval/features.py): exact on real clips, and each one drops on
the corruptions it is named after (the table in eval/toy.py's docstring), stays put on the ones it is blind
to by design, and the Frechet distance sees them all."""

import math

import numpy as np
import pytest
import torch

from framecast.data.shapes import COLOURS, SHAPES, ShapesDataset
from framecast.eval import features as Fe
from framecast.eval import toy as T

N, FR, H, W = 48, 8, 32, 32


@pytest.fixture(scope="module")
def real():
    return T.real_clips(N, FR, H, W, seed=321)


def shuffled_frames(v):
    return v[:, torch.randperm(v.shape[1], generator=torch.Generator().manual_seed(0))]


def identity_swap(v):
    """The second half of every clip comes from another clip: the object changes identity mid-clip."""
    w = v.clone()
    w[:, v.shape[1] // 2:] = v.roll(1, 0)[:, v.shape[1] // 2:]
    return w


def wash(v):
    """Every frame filled with the clip's colour: what a blown-up generator produces."""
    w = v.clone()
    w[:] = v.amax(dim=(1, 3, 4), keepdim=True)
    return w


@pytest.fixture(scope="module")
def scores(real, one_thread):
    v, caps = real
    variants = {"real": (v, caps), "blurred": (T.blur(v), caps), "frozen": (T.freeze(v), caps),
                "noise": (T.noise(v, torch.Generator().manual_seed(0)), caps),
                "shuffled_frames": (shuffled_frames(v), caps), "identity_swap": (identity_swap(v), caps),
                "wrong_captions": (v, caps[1:] + caps[:1]), "washed_out": (wash(v), caps)}
    return {k: T.clip_metrics(x, c) for k, (x, c) in variants.items()}


def test_fit_recovers_the_generative_attributes(one_thread):
    ds = ShapesDataset(FR, H, W, seed=5)
    items = [ds[i] for i in range(12)]
    f = T.fit_frames(torch.stack([s.video for s in items]))
    for b, s in enumerate(items):
        a = s.attrs
        assert (f.colour[b] == list(COLOURS).index(a.colour)).all()
        assert (f.shape[b] == SHAPES.index(a.shape)).all()
        np.testing.assert_allclose(f.size[b], a.size, rtol=0.02)
        np.testing.assert_allclose(f.centre[b], a.centres, atol=0.1)
    assert f.error.max() < 0.02


def test_real_clips_are_near_perfect(scores):
    s = scores["real"]
    for k in ("fidelity", "recognised", "subject_consistency", "dynamic_degree", "motion_smoothness",
              "instruction_following"):
        assert s[k] >= 0.98, (k, s[k])


def test_blurred_clips_lose_fidelity_not_motion(scores):
    s, r = scores["blurred"], scores["real"]
    assert s["fidelity"] < r["fidelity"] - 0.3  # targeted
    assert s["dynamic_degree"] >= 0.95 and s["follow_direction"] >= 0.95  # blind by design: it still moves


def test_frozen_clips_lose_dynamics_and_following_not_fidelity(scores):
    s = scores["frozen"]
    assert s["dynamic_degree"] == 0.0  # targeted
    assert s["follow_direction"] == 0.0 and s["follow_speed"] == 0.0 and s["instruction_following"] <= 0.5
    assert s["fidelity"] >= 0.98 and s["subject_consistency"] >= 0.98  # per-frame / identity metrics are blind


def test_noise_fails_everything(scores):
    s = scores["noise"]
    for k in ("fidelity", "recognised", "subject_consistency", "dynamic_degree", "motion_smoothness"):
        assert s[k] <= 0.2, (k, s[k])
    assert s["instruction_following"] <= 0.3


def test_washed_out_frames_are_no_sprites(scores):
    """A frame-filling colour is not a frame-sized square: fits are limited to the toy's sprite sizes."""
    s = scores["washed_out"]
    assert s["recognised"] == 0.0 and s["fidelity"] < 0.3 and s["dynamic_degree"] == 0.0


def test_shuffled_frames_lose_smoothness(scores):
    assert scores["shuffled_frames"]["motion_smoothness"] < 0.3
    assert scores["shuffled_frames"]["fidelity"] >= 0.98


def test_identity_swap_loses_consistency(scores):
    assert scores["identity_swap"]["subject_consistency"] < 0.6


def test_wrong_captions_lose_instruction_following(scores):
    s = scores["wrong_captions"]
    assert s["instruction_following"] < 0.7 and s["follow_colour"] < 0.4
    assert s["fidelity"] >= 0.98  # caption-free metrics do not care


def test_bounces_are_smooth_and_counted_as_motion(one_thread):
    """Clips with bounces (fast sprites in a small frame bounce often) keep smoothness exact."""
    ds = ShapesDataset(12, 24, 24, seed=9)
    items = [ds[i] for i in range(40)]
    items = [s for s in items if s.attrs.bounces > 0]
    assert len(items) >= 5
    f = T.fit_frames(torch.stack([s.video for s in items]))
    assert T.motion_smoothness(f).min() == 1.0
    assert T.dynamic_degree(f, [s.caption for s in items]).min() == 1.0


def test_bad_input_is_named():
    with pytest.raises(ValueError, match=r"\[B, F, 3, H, W\]"):
        T.fit_frames(torch.zeros(2, 8, 32, 32))
    with pytest.raises(ValueError, match="captions"):
        T.instruction_following(T.fit_frames(torch.zeros(2, 4, 3, 16, 16) - 1), ["a red circle moving left slow"])
    with pytest.raises(ValueError, match="unknown colour"):
        T.clip_metrics(torch.zeros(1, 4, 3, 16, 16), ["a purple circle moving left slow"])


def test_empty_frames_score_zero():
    v = torch.full((2, 4, 3, 16, 16), -1.0)
    m = T.clip_metrics(v, ["a red circle moving left slow"] * 2)
    assert m["fidelity"] == 0 and m["recognised"] == 0 and m["dynamic_degree"] == 0


# ---- Frechet distance


def test_frechet_distance_matches_the_gaussian_closed_form():
    g = torch.Generator().manual_seed(0)
    d, n = 6, 400
    a = torch.randn(n, d, generator=g, dtype=torch.float64)
    a = a - a.mean(0)
    a = a @ torch.linalg.inv(torch.linalg.cholesky(torch.cov(a.T))).T  # exactly mean 0, covariance I
    m, s = torch.arange(d, dtype=torch.float64) / d, 1.7
    b = a * s + m  # mean m, covariance s^2 I
    want = float((m**2).sum()) + d * (1 - s) ** 2
    assert math.isclose(Fe.frechet_distance(a, b), want, rel_tol=1e-8)
    assert abs(Fe.frechet_distance(a, a)) < 1e-8
    with pytest.raises(ValueError, match="same D"):
        Fe.frechet_distance(a, b[:, :3])


def test_encoder_frechet_distance_ranks_corruptions(tmp_path, one_thread):
    v, _ = T.real_clips(128, FR, H, W, seed=321)  # FD is biased upwards at small N: the real floor needs N >~ 100
    enc, acc = Fe.load_or_train_encoder(tmp_path, FR, H, W, steps=150, progress=False)
    assert acc["colour"] > 0.9  # it did learn from real clips
    ref = Fe.features(enc, T.real_clips(256, FR, H, W, seed=654)[0])
    fd = {k: Fe.frechet_distance(Fe.features(enc, x), ref)
          for k, x in {"real": v, "blurred": T.blur(v), "frozen": T.freeze(v),
                       "noise": T.noise(v, torch.Generator().manual_seed(0))}.items()}
    for k in ("blurred", "frozen", "noise"):
        assert fd[k] > 2 * fd["real"], fd
    again, _ = Fe.load_or_train_encoder(tmp_path, FR, H, W, steps=150, progress=False)  # cached: same weights
    assert torch.equal(Fe.features(again, v[:4]), Fe.features(enc, v[:4]))
    cached = next(tmp_path.glob("toy_encoder_*.safetensors"))
    cached.write_bytes(b"not a safetensors file")
    with pytest.raises(RuntimeError, match="unreadable"):
        Fe.load_or_train_encoder(tmp_path, FR, H, W, steps=150, progress=False)


def test_speed_ratio_reads_how_fast_against_the_caption(real, one_thread):
    """Real clips move at the captioned speed (bounces included); a frozen clip at 0; every other frame of a
    longer clip at twice the speed."""
    v, caps = real
    fits = T.fit_frames(v)
    ratio = T.speed_ratio(fits, caps)
    assert np.allclose(ratio, 1.0, atol=0.05)
    # clip_scores takes the fits too (base_quality fits once for both): the same scores as from the clips
    from_fits, from_clips = T.clip_scores(fits, caps), T.clip_scores(v, caps)
    assert all(np.array_equal(from_fits[k], from_clips[k]) for k in from_clips)
    assert np.allclose(T.speed_ratio(T.fit_frames(T.freeze(v)), caps), 0.0)
    long = ShapesDataset(2 * FR - 1, H, W, seed=5)
    items = [long[i] for i in range(80)]
    items = [s for s in items if s.attrs.bounces == 0]
    assert len(items) >= 3
    double = torch.stack([s.video[::2] for s in items])  # [B, FR, 3, H, W]
    assert np.allclose(T.speed_ratio(T.fit_frames(double), [s.caption for s in items]), 2.0, atol=0.1)
    with pytest.raises(ValueError, match="2 captions for 48 clips"):
        T.speed_ratio(T.fit_frames(v), caps[:2])
