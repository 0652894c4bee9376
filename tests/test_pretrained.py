"""The models shipped in framecast/pretrained: checksums, loading by name, and the errors around them.

The checksum test fails when a weight file changes without its registry entry (or the other way round); the
load test samples the shipped toy base and scores it, so a broken file, config or spec cannot ship silently.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from framecast import pretrained
from framecast.errors import CheckpointError
from framecast.generate import load
from framecast.train import checkpoint as ckpt

SHIPPED = sorted(pretrained.REGISTRY)


def test_something_is_shipped():
    assert "toy-base" in SHIPPED


@pytest.mark.parametrize("name", SHIPPED)
def test_checksum_matches_registry(name):
    w = pretrained.weights_file(name)
    assert w.is_file(), w
    assert pretrained.sha256(w) == pretrained.REGISTRY[name]
    man = pretrained.manifest(name)
    assert man["sha256"] == pretrained.REGISTRY[name], "manifest.json and the registry disagree"
    assert w.stat().st_size < 20e6, "a shipped model adds at most ~20 MB to the repository"
    for key in ("recipe", "command", "steps", "scores", "parameters"):
        assert key in man, f"manifest.json of {name} lacks {key!r}"


@pytest.mark.parametrize("name", SHIPPED)
def test_resolves_and_reads_metadata(name):
    src = ckpt.resolve(f"pretrained:{name}")
    meta = ckpt.read_meta(src)
    assert meta["stage"] == pretrained.manifest(name)["stage"]


def test_toy_base_loads_and_samples(one_thread):
    from framecast.eval import toy as T

    m = load("pretrained:toy-base")
    assert m.spec.mode == "bidirectional" and m.spec.guidance > 1
    _, h, w = m.spec.pixel_shape
    _, captions = T.real_clips(4, m.spec.num_frames, h, w, seed=1)
    video = m.sample(captions, seed=0, steps=12)  # [B, F, C, H, W] in [-1, 1]
    assert video.shape == (4, m.spec.num_frames, *m.spec.pixel_shape)
    assert torch.isfinite(video).all()
    # a trained base draws objects: most frames hold a recognised sprite even at 12 steps (noise holds none)
    assert T.clip_metrics(video, captions)["recognised"] > 0.5


def test_unknown_name_lists_the_shipped_ones():
    with pytest.raises(CheckpointError, match="no shipped model named pretrained:nope; shipped: .*toy-base"):
        ckpt.resolve("pretrained:nope")
    with pytest.raises(CheckpointError, match="no shipped model"):
        load("pretrained:nope")


def test_corrupt_weights_are_one_clear_error(tmp_path, monkeypatch):
    """A copy of the shipped folder with one flipped byte is refused by its checksum; the original is untouched."""
    shutil.copytree(pretrained.ROOT / "toy-base", tmp_path / "toy-base")
    monkeypatch.setattr(pretrained, "ROOT", tmp_path)
    monkeypatch.setattr(pretrained, "_verified", set())
    w = pretrained.weights_file("toy-base")
    data = bytearray(w.read_bytes())
    data[-1] ^= 0xFF
    w.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt or was replaced"):
        ckpt.resolve("pretrained:toy-base")
    with pytest.raises(CheckpointError, match="corrupt or was replaced"):
        load("pretrained:toy-base")
    w.unlink()
    with pytest.raises(CheckpointError, match="weights .* are missing"):
        ckpt.resolve("pretrained:toy-base")
    json.loads((tmp_path / "toy-base" / "manifest.json").read_text())  # the manifest itself is still readable


WORLD = [n for n in SHIPPED if "check" in pretrained.manifest(n)]


@pytest.mark.parametrize("name", WORLD)
def test_shipped_world_model_plays_and_its_scores_do_not_regress(name, one_thread):
    """A shipped world model: `framecast play --pretrained NAME` finds its start views, and its open-loop scores
    on freshly recorded held-out episodes (eval/world/regression.py) are the ones measured when it shipped."""
    pytest.importorskip("minigrid")
    from framecast.eval.world.regression import check_scores
    from framecast.play import load_world

    w = load_world(f"pretrained:{name}", fps=0)
    assert w.start_frames is not None and len(w.start_frames) == pretrained.manifest(name)["start"]["episodes"]
    shipped = pretrained.manifest(name)["check"]
    got = check_scores(load(f"pretrained:{name}"), shipped, episodes=shipped["episodes"], frames=shipped["frames"],
                       seed=shipped["seed"])
    assert set(got["scores"]) == set(shipped["scores"])
    for key, value in shipped["scores"].items():  # float summation order may differ across machines
        assert got["scores"][key] == pytest.approx(value, abs=0.02 if "psnr" in key else 0.005), key


def test_a_pinned_name_loads_its_weights_and_refuses_a_replaced_file():
    """`pretrained:<name>@<pin>` (what a recipe stores) resolves like the bare name while the shipped file is the
    pinned one, and is one error naming both versions once the registry holds another file."""
    name = "pretrained:toy-base"
    pin = pretrained.pinned(name)
    assert pin == f"{name}@{pretrained.REGISTRY['toy-base'][:pretrained.PIN]}" and pretrained.pinned(pin) == pin
    assert ckpt.resolve(pin) == ckpt.resolve(name)
    other = f"{name}@{'0' * pretrained.PIN}"
    with pytest.raises(CheckpointError, match=f"SHA-256 starts {'0' * pretrained.PIN}, but the shipped "
                                              f"pretrained:toy-base is now {pin.rpartition('@')[2]}"):
        ckpt.resolve(other)
    assert pretrained.same_model(pin, pin) is True and pretrained.same_model(pin, other) is False
    assert pretrained.same_model(pin, name) is None  # unpinned: only the names can be compared
    assert pretrained.same_model(pin, "pretrained:minigrid") is False
    with pytest.raises(CheckpointError, match="no shipped model named pretrained:nope"):
        pretrained.pinned("pretrained:nope")


def test_recipes_pin_shipped_inits_so_a_replaced_base_is_another_run(tmp_path):
    """A stage that starts from a shipped model stores the pinned name; a run stored with another pin is refused
    as other settings, and one stored unpinned (before pinning) is still the same run."""
    from framecast import config as C
    from framecast.recipe import StageResult, resolve_refs
    from framecast.runs import changed_keys

    toy = Path(__file__).resolve().parents[1] / "configs" / "toy.yaml"
    base = C.load(toy, ["stage=stage0", f"out_dir={tmp_path}"])
    used = StageResult("stage0", C.from_dict({"use": "pretrained:toy-base"}, base=base), tmp_path, 0.0, True)
    stage1 = resolve_refs(C.from_dict({"stage": "stage1"}, base=base), {"stage0": used}, "stage1")
    assert stage1.init == pretrained.pinned("pretrained:toy-base")
    direct = resolve_refs(C.from_dict({"init": "pretrained:toy-base"}, base=base), {}, "stage0")
    assert direct.init == stage1.init
    assert changed_keys(stage1, stage1) == []
    assert changed_keys(C.from_dict({"init": "pretrained:toy-base"}, base=stage1), stage1) == []
    replaced = C.from_dict({"init": f"pretrained:toy-base@{'0' * pretrained.PIN}"}, base=stage1)
    assert changed_keys(replaced, stage1) == ["init"]
    assert changed_keys(C.from_dict({"init": "pretrained:minigrid"}, base=stage1), stage1) == ["init"]
