import numpy as np
import pytest
import torch

from framecast.data.shapes import (
    COLOURS,
    DIRECTIONS,
    SHAPES,
    SPEEDS,
    ShapesDataset,
    SpriteAttrs,
    all_captions,
    caption_of,
    collate,
    parse_caption,
    render,
    simulate,
)

F, H, W = 8, 24, 40  # non-square so x/y mix-ups show up


@pytest.fixture(scope="module")
def ds():
    return ShapesDataset(F, H, W, seed=3)


def coverage(sample):
    """Per-pixel sprite coverage in [0, 1], recovered from the rendered video."""
    rgb = torch.tensor(COLOURS[sample.attrs.colour])
    return ((sample.video + 1) / 2).sum(1) / rgb.sum()


def centroid(mask):
    ys, xs = torch.meshgrid(torch.arange(H) + 0.5, torch.arange(W) + 0.5, indexing="ij")
    return np.array([(mask * xs).sum() / mask.sum(), (mask * ys).sum() / mask.sum()])


def test_determinism(ds):
    a, b = ds[5], ShapesDataset(F, H, W, seed=3)[5]
    assert torch.equal(a.video, b.video) and a.caption == b.caption
    assert not torch.equal(ds[5].video, ds[6].video)
    assert not torch.equal(ShapesDataset(F, H, W, seed=4)[5].video, a.video)


def test_shapes_and_ranges(ds):
    for i in range(6):
        s = ds[i]
        assert s.video.shape == (F, 3, H, W) and s.video.dtype == torch.float32
        assert s.video.min() >= -1 and s.video.max() <= 1
        ys, xs = np.meshgrid(np.arange(H) + 0.5, np.arange(W) + 0.5, indexing="ij")
        for f in range(F):
            cx, cy = s.attrs.centres[f]
            far = np.hypot(xs - cx, ys - cy) > s.attrs.size * 0.75 + 1
            assert far.any()
            assert (s.video[f][:, torch.from_numpy(far)] == -1).all()


def test_caption_round_trip(ds):
    for i in range(20):
        attrs = ds.sample_attrs(i)
        parsed = parse_caption(caption_of(attrs))
        assert parsed == {k: getattr(attrs, k) for k in ("colour", "shape", "direction", "speed")}
        assert ds[i].caption == caption_of(attrs)
    caps = all_captions()
    assert len(caps) == 144 and len(set(caps)) == 144
    assert all(caption_of(parse_caption(c)) == c for c in caps)
    assert parse_caption("a red circle moving left fast") == dict(
        colour="red", shape="circle", direction="left", speed="fast")
    with pytest.raises(ValueError, match="purple"):
        parse_caption("a purple blob")
    with pytest.raises(ValueError):
        parse_caption("a red circle moving left")


def test_attributes_cover_grammar(ds):
    seen = [ds.sample_attrs(i) for i in range(300)]
    assert {a.colour for a in seen} == set(COLOURS)
    assert {a.shape for a in seen} == set(SHAPES)
    assert {a.direction for a in seen} == set(DIRECTIONS)
    assert {a.speed for a in seen} == set(SPEEDS)
    lo, hi = 0.3 * min(H, W), 0.42 * min(H, W)
    assert all(lo <= a.size <= hi for a in seen)


def test_colour(ds):
    for i in range(12):
        s = ds[i]
        expected = torch.tensor(COLOURS[s.attrs.colour]) * 2 - 1
        for f in (0, F - 1):
            frame = s.video[f]
            total = frame.sum(0)
            full = total == total.max()
            assert full.sum() > 0
            assert torch.allclose(frame[:, full].mean(1), expected, atol=1e-5)


def test_motion_follows_caption(ds):
    checked = 0
    for i in range(30):
        s = ds[i]
        a = s.attrs
        v0 = np.array(DIRECTIONS[a.direction]) * SPEEDS[a.speed] * W
        np.testing.assert_allclose(a.velocities[0], v0)
        mask = coverage(s)
        for f in range(F - 1):
            if np.array_equal(a.velocities[f], a.velocities[f + 1]):  # no bounce in this step
                moved = centroid(mask[f + 1]) - centroid(mask[f])
                np.testing.assert_allclose(moved, a.velocities[f], atol=0.3)
                checked += 1
        if a.shape != "triangle":  # a triangle's centroid sits below its bbox centre
            for f in range(F):
                np.testing.assert_allclose(centroid(mask[f]), a.centres[f], atol=0.3)
    assert checked > 50


def test_speed_in_pixels():
    # At width 32 the grammar promises 1 px/frame (slow) and 2 px/frame (fast).
    small = ShapesDataset(4, 16, 32)
    speeds = {a.speed: np.abs(a.velocities[0]).sum() for a in map(small.sample_attrs, range(40))}
    assert speeds == {"slow": 1.0, "fast": 2.0}


def test_bounce_off_right_wall():
    size, speed = 8.0, 2.0
    start = np.array([W - size / 2 - 0.5, H / 2])
    centres, velocities, bounces = simulate(start, np.array([speed, 0.0]), size, 12, H, W)
    assert centres.shape == velocities.shape == (12, 2)
    assert bounces >= 1
    assert velocities[0, 0] == speed and velocities[1, 0] == -speed
    np.testing.assert_allclose(centres[1], [W - size / 2 - 1.5, H / 2])  # reflected about the wall
    assert (centres[:, 0] >= size / 2).all() and (centres[:, 0] <= W - size / 2).all()
    attrs = SpriteAttrs("red", "square", "right", "fast", size, centres, velocities, bounces)
    video = render(attrs, H, W)
    area = ((video + 1) / 2).sum(1).sum((1, 2)) / sum(COLOURS["red"])
    # Constant visible area on every frame means the sprite never left the frame.
    np.testing.assert_allclose(area.numpy(), size**2, atol=1e-3)


def test_multimodal_caption_conditioning(ds):
    caption = "a blue triangle moving up slow"
    a, b = ds.sample_for_caption(caption, 0), ds.sample_for_caption(caption, 1)
    assert a.caption == b.caption == caption
    for field in ("colour", "shape", "direction", "speed"):
        assert getattr(a.attrs, field) == getattr(b.attrs, field) == parse_caption(caption)[field]
    assert not np.allclose(a.attrs.centres[0], b.attrs.centres[0])
    assert torch.equal(a.video, ds.sample_for_caption(caption, 0).video)


def test_collate(ds):
    videos, captions = collate([ds[0], ds[1], ds[2]])
    assert videos.shape == (3, F, 3, H, W)
    assert captions == [ds[i].caption for i in range(3)]


@pytest.mark.parametrize("kwargs", [
    dict(num_frames=0, height=16, width=16),
    dict(num_frames=4, height=7, width=16),
    dict(num_frames=4, height=16, width=4),
])
def test_bad_args(kwargs):
    bad = next(k for k, v in kwargs.items() if v < (1 if k == "num_frames" else 8))
    with pytest.raises(ValueError, match=bad):
        ShapesDataset(**kwargs)


def test_index_out_of_range(ds):
    with pytest.raises(IndexError, match="out of range"):
        ds[len(ds)]
