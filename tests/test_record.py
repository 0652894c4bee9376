"""framecast record: deterministic, resumable MiniGrid episodes with actions aligned to the frames they lead to."""

import json

import pytest
import torch

pytest.importorskip("minigrid", reason="framecast record needs the [world] extra: pip install -e '.[world]'")

from framecast.cli import main  # noqa: E402
from framecast.data.envs import (  # noqa: E402
    ENVS,
    Environment,
    EnvSpec,
    RecordError,
    load_episodes,
    record,
)
from framecast.errors import DataError, UserError  # noqa: E402


def _old_manifest_resumes_and_another_setting_is_refused(env, root, key, old, new, **kw):
    """A recording from before the manifest had `key` reads as `old` and resumes; asking it for `new` is refused."""
    man = json.loads((root / "manifest.json").read_text())
    del man[key]
    (root / "manifest.json").write_text(json.dumps(man))
    assert load_episodes(root)["manifest"][key] == old
    record(env, root, progress=False, **kw)
    with pytest.raises(RecordError, match=f"{key}: '{old}' there, '{new}' asked"):
        record(env, root, progress=False, **kw, **{key: new})


def test_record_is_deterministic_resumable_and_aligned(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    record("minigrid", a, episodes=5, frames=10, seed=3, shard_size=2, progress=False)
    record("minigrid", b, episodes=5, frames=10, seed=3, shard_size=2, progress=False)
    da, db = load_episodes(a), load_episodes(b)
    assert da["frames"].shape == (5, 10, 3, 32, 32) and da["frames"].dtype == torch.uint8
    for k in ("frames", "actions", "state"):
        assert torch.equal(da[k], db[k]), k
    assert (da["actions"][:, 0] == 4).all() and da["actions"][:, 1:].lt(4).all()  # frame 0: null action
    assert da["manifest"]["actions"] == ["left", "right", "forward", "stay"]
    # actions[:, f] leads to frame f: a turn changes the heading at that very frame, forward never turns, stay
    # changes nothing (state or view)
    st, acts = da["state"], da["actions"][:, 1:]
    d_heading = (st[:, 1:, 2] - st[:, :-1, 2]) % 4
    assert (d_heading[acts == 0] == 3).all() and (d_heading[acts == 1] == 1).all() and (d_heading[acts == 2] == 0).all()
    stay = acts == 3
    assert stay.any() and torch.equal(st[:, 1:][stay], st[:, :-1][stay])
    assert torch.equal(da["frames"][:, 1:][stay], da["frames"][:, :-1][stay])
    # a cut-off run: lose a shard, re-run, get the identical recording back
    (a / "shard_00001.safetensors").unlink()
    record("minigrid", a, episodes=5, frames=10, seed=3, shard_size=2, progress=False)
    assert torch.equal(load_episodes(a)["frames"], db["frames"])
    other = load_episodes(record("minigrid", tmp_path / "c", episodes=5, frames=10, seed=4, shard_size=2,
                                 progress=False).parent)
    assert not torch.equal(other["frames"], da["frames"])  # held-out data = another seed


def test_record_refuses_a_different_recording_and_names_bad_files(tmp_path):
    record("minigrid", tmp_path, episodes=2, frames=4, seed=0, shard_size=2, progress=False)
    before = (tmp_path / "shard_00000.safetensors").read_bytes()
    with pytest.raises(RecordError, match="frames: 4 there, 6 asked"):
        record("minigrid", tmp_path, episodes=2, frames=6, seed=0, shard_size=2, progress=False)
    assert (tmp_path / "shard_00000.safetensors").read_bytes() == before  # nothing saved was touched
    assert json.loads((tmp_path / "manifest.json").read_text())["frames"] == 4
    (tmp_path / "shard_00000.safetensors").write_bytes(b"junk")
    with pytest.raises(RecordError, match="unreadable"):
        load_episodes(tmp_path)
    with pytest.raises(RecordError, match="too small"):
        record("minigrid", tmp_path / "small", episodes=1, frames=2, tile=8, size=32, progress=False)
    with pytest.raises(RecordError, match="unknown environment"):
        record("doom", tmp_path / "x", episodes=1, frames=2)


def test_align_tile_puts_the_view_on_the_token_grid_and_keeps_every_cell(tmp_path):
    """`align="tile"` moves MiniGrid's view to the tile grid (offset 0), so that with patch = tile each token is one
    cell; it is the same recording otherwise: the layout rule reads the same cells from both, the padding is black,
    and a manifest written before `align` existed reads as centred."""
    from framecast.eval.world import minigrid_layout, to_video

    c = load_episodes(record("minigrid", tmp_path / "c", episodes=3, frames=6, seed=2, progress=False).parent)
    t = load_episodes(record("minigrid", tmp_path / "t", episodes=3, frames=6, seed=2, align="tile",
                             progress=False).parent)
    assert c["manifest"]["align"] == "center" and t["manifest"]["align"] == "tile"
    assert torch.equal(t["frames"][..., :28, :28], c["frames"][..., 2:30, 2:30])  # 7 cells x tile 4 = 28 px
    assert t["frames"][..., 28:, :].eq(0).all() and t["frames"][..., :, 28:].eq(0).all()
    assert torch.equal(t["actions"], c["actions"]) and torch.equal(t["state"], c["state"])
    lay_c = minigrid_layout(to_video(c["frames"]), tile=4, size=32)
    lay_t = minigrid_layout(to_video(t["frames"]), tile=4, size=32, align="tile")
    assert torch.equal(lay_c, lay_t)
    assert not torch.equal(minigrid_layout(to_video(t["frames"]), tile=4, size=32), lay_t)  # misread as centred
    # a recording from before `align`: its manifest has no key and reads as centred; resuming it still works
    _old_manifest_resumes_and_another_setting_is_refused("minigrid", tmp_path / "c", "align", "center", "tile",
                                                         episodes=3, frames=6, seed=2)
    with pytest.raises(RecordError, match="unknown view alignment 'left'"):
        record("minigrid", tmp_path / "x", episodes=1, frames=2, align="left", progress=False)
    assert not (tmp_path / "x").exists()
    with pytest.raises(RecordError, match="resized, not padded"):
        record("breakout", tmp_path / "y", episodes=1, frames=2, align="tile", progress=False)


def test_turn_repeat_records_runs_of_turns_and_zero_is_the_first_policy(tmp_path):
    """--turn-repeat p: a turn is followed by the same turn with probability p (runs of four close a loop); at 0
    the recording is the first policy's, draw for draw."""
    import numpy as np

    from framecast.data.envs import MiniGrid

    spec, rng_a, rng_b = MiniGrid(), np.random.default_rng(0), np.random.default_rng(0)
    first = [int(rng_a.choice(4, p=[0.15, 0.15, 0.55, 0.15])) for _ in range(200)]  # the first policy, unblocked
    assert [spec.policy_step(rng_b, 0, False, 0.0) for _ in range(200)] == first  # after a turn: no extra draw
    base = load_episodes(record("minigrid", tmp_path / "a", episodes=16, frames=16, seed=0, progress=False).parent)
    runs = load_episodes(record("minigrid", tmp_path / "b", episodes=16, frames=16, seed=0, turn_repeat=0.8,
                                progress=False).parent)
    assert base["manifest"]["turn_repeat"] == 0.0 and runs["manifest"]["turn_repeat"] == 0.8

    def repeats(a):  # how often a turn is followed by the same turn
        prev, nxt = a[:, 1:-1], a[:, 2:]
        turn = prev < 2
        return float((nxt[turn] == prev[turn]).float().mean())

    assert repeats(runs["actions"]) > 0.75 > 0.4 > repeats(base["actions"])
    assert torch.equal(runs["frames"][:, 0], base["frames"][:, 0])  # the same worlds, explored differently
    with pytest.raises(RecordError, match="probability in"):
        record("minigrid", tmp_path / "x", episodes=1, frames=2, turn_repeat=1.0, progress=False)
    with pytest.raises(RecordError, match="its own policy"):
        record("breakout", tmp_path / "y", episodes=1, frames=2, turn_repeat=0.5, progress=False)


def test_record_cli(tmp_path, capsys):
    assert main(["record", "minigrid", "--out", str(tmp_path), "--episodes", "3", "--frames", "5",
                 "--shard-size", "2"]) == 0
    assert load_episodes(tmp_path)["frames"].shape[:2] == (3, 5)
    assert main(["record", "minigrid", "--out", str(tmp_path), "--episodes", "3", "--frames", "6"]) == 2
    assert "different recording" in capsys.readouterr().err


def test_record_breakout_32px_paddle_follows_actions(tmp_path):
    pytest.importorskip("ale_py", reason="Breakout needs ale-py (the [world] extra)")
    d = load_episodes(record("breakout", tmp_path, episodes=3, frames=24, seed=0, shard_size=2, progress=False).parent)
    assert d["frames"].shape == (3, 24, 3, 32, 32) and d["manifest"]["state_fields"][0] == "paddle_x"
    assert (d["actions"][:, 0] == 4).all()
    again = load_episodes(record("breakout", tmp_path / "again", episodes=3, frames=24, seed=0, shard_size=2,
                                 progress=False).parent)
    assert torch.equal(again["frames"], d["frames"])  # sticky actions off: replay is exact
    # actions[:, f] leads to frame f: RIGHT never moves the paddle left, LEFT never right, and both move it
    dx = d["state"][:, 1:, 0] - d["state"][:, :-1, 0]
    acts = d["actions"][:, 1:]
    assert (dx[acts == 2] >= 0).all() and (dx[acts == 3] <= 0).all()
    assert (dx[acts == 2] > 0).any() and (dx[acts == 3] < 0).any()
    assert d["frames"].float().std() > 5  # a real screen, not a blank one


def test_environments_are_one_class_each():
    """The registry holds one Environment per name; play and the CLI read actions, keys and key_map from it."""
    assert EnvSpec is Environment and issubclass(RecordError, DataError) and issubclass(RecordError, UserError)
    for name, env in ENVS.items():
        assert isinstance(env, Environment) and env.name == name and env.null_action == len(env.actions)
        assert len(env.actions) == len(env.env_actions) == len(env.keys) and "stay" in env.actions
        assert set(env.key_map.values()) == {a for a, k in zip(env.actions, env.keys) if k}
    assert ENVS["minigrid"].key_map == {"ArrowLeft": "left", "ArrowRight": "right", "ArrowUp": "forward"}
    assert ENVS["breakout"].key_map == {" ": "fire", "ArrowRight": "right", "ArrowLeft": "left"}
    assert (ENVS["minigrid"].size, ENVS["breakout"].size) == (32, 32)
    mg = ENVS["minigrid"]
    assert mg.blocked(2, [1, 1, 0], [1, 1, 0]) and not mg.blocked(2, [1, 1, 0], [2, 1, 0])
    assert not mg.blocked(0, [1, 1, 0], [1, 1, 0])  # a turn in place is not blocked


def test_max_resample_is_the_block_maximum_and_keeps_thin_objects():
    """`resample="max"`: every frame pixel is the channel-wise maximum of its block of screen pixels (checked against
    a loop over blocks), so a one-pixel object keeps its full colour where an area-weighted resize dims it."""
    import numpy as np

    from framecast.data.environments import max_pool

    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (210, 160, 3), dtype=np.uint8)
    out = max_pool(img, 32)
    rows, cols = (np.arange(33) * 210) // 32, (np.arange(33) * 160) // 32
    want = np.stack([np.stack([img[rows[i]:rows[i + 1], cols[j]:cols[j + 1]].max((0, 1)) for j in range(32)])
                     for i in range(32)])
    assert out.shape == (32, 32, 3) and np.array_equal(out, want)
    dot = np.zeros((210, 160, 3), np.uint8)
    dot[101, 77] = (200, 72, 72)  # a ball-sized speck
    assert max_pool(dot, 32).reshape(-1, 3).max(0).tolist() == [200, 72, 72]
    assert ENVS["breakout"].view(dot, 32).max() < 50  # the area resize all but loses it
    with pytest.raises(RecordError, match="smaller than size 64"):
        max_pool(img[:40], 64)


def test_record_breakout_max_resample_manifest_and_refusals(tmp_path):
    pytest.importorskip("ale_py", reason="Breakout needs ale-py (the [world] extra)")
    m = load_episodes(record("breakout", tmp_path / "m", episodes=2, frames=12, seed=0, resample="max",
                             progress=False).parent)
    a = load_episodes(record("breakout", tmp_path / "a", episodes=2, frames=12, seed=0, progress=False).parent)
    assert m["manifest"]["resample"] == "max" and a["manifest"]["resample"] == "area"
    assert torch.equal(m["state"], a["state"]) and torch.equal(m["actions"], a["actions"])  # the same play
    # the paddle row: the block maximum keeps the paddle's red at full strength, the area resize dims it
    # (rows 28-29 of 32 hold the paddle; columns 2-29 leave out the side walls)
    assert m["frames"][:, :, 0, 28:30, 2:30].amax() >= 180 and a["frames"][:, :, 0, 28:30, 2:30].amax() < 100
    _old_manifest_resumes_and_another_setting_is_refused("breakout", tmp_path / "a", "resample", "area", "max",
                                                         episodes=2, frames=12, seed=0)
    with pytest.raises(RecordError, match="unknown resampling 'nearest'"):
        record("breakout", tmp_path / "x", episodes=1, frames=2, resample="nearest", progress=False)
    with pytest.raises(RecordError, match="padded, not resized"):
        record("minigrid", tmp_path / "y", episodes=1, frames=2, resample="max", progress=False)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
