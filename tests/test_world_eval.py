"""World-model metrics (eval/world/, docs/world_model.md, metrics): an IDM trained on a few hundred real MiniGrid
transitions reads actions far above the shuffled floor and is cached; the state probe has one head per state
field of the right kind; loop closure on the real environment's own frames puts the four-turn view on top;
world_metrics returns every key, and a model that ignores actions scores the same under shuffled actions."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("minigrid", reason="needs the [world] extra: pip install -e '.[world]'")

from framecast import config as C  # noqa: E402
from framecast.data.envs import ENVS, RecordError, load_episodes, record  # noqa: E402
from framecast.errors import CheckpointError  # noqa: E402
from framecast.eval import world as W  # noqa: E402
from framecast.eval.world import probes  # noqa: E402
from framecast.generate import LoadedModel, build_denoiser, codec_for, text_encoder_for  # noqa: E402
from framecast.stages import sampling_spec  # noqa: E402

from .conftest import randomise  # noqa: E402

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


@pytest.fixture(scope="module")
def idm(recordings, tmp_path_factory, one_thread):
    net, _ = W.load_or_train_idm(recordings[0], tmp_path_factory.mktemp("cache"), steps=300, batch_size=64,
                                 width=16, progress=False)
    return net


def test_idm_reads_real_actions_far_above_the_shuffled_floor(recordings, idm, one_thread):
    ref = W.real_reference(recordings[1], idm)
    # turns rotate the view and forward shifts it: distinct even for a 300-step IDM; the floor is what agreeing
    # with the action statistics by chance gives (~0.37 with half the actions forward); measured 0.79-0.82 vs
    # 0.37-0.40 over three seeds, an untrained IDM 0.18 vs 0.18
    assert ref["idm_acc"] > 0.65 and ref["idm_acc"] > ref["idm_acc_shuffled"] + 0.25, ref
    ep = load_episodes(recordings[1])
    video = W.to_video(ep["frames"])
    pred = W.idm_predict(idm, video, start=3)
    assert pred.shape == (16, 5) and int(pred.max()) < 4  # never the null action
    cm = torch.tensor(ref["idm_confusion"])
    assert cm.shape == (4, 4) and int(cm.sum()) == 16 * 7
    assert float(cm.diag().sum() / cm.sum()) == pytest.approx(ref["idm_acc"])
    assert W.idm_accuracy(idm, video, ep["actions"], start=3) == pytest.approx(
        float((pred == ep["actions"][:, 3:]).float().mean()))
    with pytest.raises(ValueError, match=r"\[B, 6, H, W\]"):
        idm(video[:, 0])
    with pytest.raises(ValueError, match="do not match"):
        W.idm_accuracy(idm, video, ep["actions"][:, :4])


def test_idm_is_deterministic_and_cached(recordings, tmp_path, monkeypatch, one_thread):
    kw = dict(steps=20, batch_size=32, width=8, progress=False)
    a, info = W.load_or_train_idm(recordings[0], tmp_path, **kw)
    b, _ = W.train_idm(recordings[0], **kw)
    for (k, v), w in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(v, w), k
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) == 2 and info["manifest"]["env"] == "minigrid" and info["steps"] == 20

    def no_training(*a, **k):
        raise AssertionError("a cached IDM was retrained")

    monkeypatch.setattr(probes, "train_idm", no_training)  # the name load_or_train_idm calls
    c, _ = W.load_or_train_idm(recordings[0], tmp_path, **kw)  # from the cache
    assert all(torch.equal(v, w) for v, w in zip(a.state_dict().values(), c.state_dict().values()))
    with pytest.raises(AssertionError, match="retrained"):  # other settings: another cache entry
        W.load_or_train_idm(recordings[0], tmp_path, **{**kw, "seed": 1})
    next(tmp_path.glob("*.safetensors")).write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="unreadable.*delete it"):
        W.load_or_train_idm(recordings[0], tmp_path, **kw)
    with pytest.raises(RecordError, match="manifest.json is missing"):  # a user error, printed as one line
        W.load_or_train_idm(tmp_path / "nowhere", tmp_path, **kw)


def test_state_probe_fields_kinds_and_scores(recordings, tmp_path, one_thread):
    probe, info = W.load_or_train_probe(recordings[0], tmp_path, steps=30, batch_size=32, width=8, progress=False)
    assert probe.fields == ["x", "y", "heading"] and probe.kinds == ["reg", "reg", "class"]
    assert probe.classes[2] == 4 and info["kinds"] == probe.kinds
    again, _ = W.load_or_train_probe(recordings[0], tmp_path, steps=30, batch_size=32, width=8, progress=False)
    assert torch.equal(again.baseline, probe.baseline) and again.classes == probe.classes  # rebuilt from JSON
    ep = load_episodes(recordings[1])
    pred = W.probe_predict(probe, W.to_video(ep["frames"]))  # [E, F, S]
    assert pred.shape == (16, 8, 3) and set(pred[..., 2].unique().tolist()) <= {0.0, 1.0, 2.0, 3.0}
    truth = ep["state"]
    perfect = W.probe_scores(probe, truth.float(), truth)
    assert perfect == {"probe_x_mae": 0.0, "probe_y_mae": 0.0, "probe_heading_acc": 1.0}
    off = truth.clone()
    off[..., 0] += 2
    off[..., 2] = (off[..., 2] + 1) % 4
    assert W.probe_scores(probe, off.float(), truth, "_s") == {"probe_x_mae_s": 2.0, "probe_y_mae_s": 0.0,
                                                                "probe_heading_acc_s": 0.0}
    ref = W.real_reference(recordings[1], W.InverseDynamics(4, 8), probe, context=2)
    assert {"probe_x_mae", "probe_heading_acc", "probe_x_mae_const", "probe_heading_acc_const"} <= set(ref)
    with pytest.raises(ValueError, match="kinds"):
        W.StateProbe(["x"], ["angle"], [0])


def test_ssim():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 3, 16, 16, generator=g) * 2 - 1
    assert torch.allclose(W.ssim(x, x), torch.ones(2, 3), atol=1e-5)
    noisy = [W.ssim((x + s * torch.randn(x.shape, generator=g)).clamp(-1, 1), x).mean() for s in (0.05, 0.3)]
    assert 1 > noisy[0] > noisy[1]
    assert W.ssim(x[..., :6, :6], x[..., :6, :6]).shape == (2, 3)  # small frames: smaller window
    with pytest.raises(ValueError, match="ssim"):
        W.ssim(x, x[:1])


def _env_rollouts(seeds, steps: int = 4):
    """The real environment as a perfect world model: start views and the views after each repeated action."""
    spec = ENVS["minigrid"]
    env = spec.make(2)
    starts, out = [], {a: [] for a in W.LOOP_SEQUENCES}
    for s in seeds:
        for a in W.LOOP_SEQUENCES:
            obs, _ = env.reset(seed=s)
            start = spec.view(obs, 16)
            views = [spec.view(env.step(spec.env_actions[spec.actions.index(a)])[0], 16) for _ in range(steps)]
            out[a].append(np.stack(views))
        starts.append(start)
    to = lambda arr: W.to_video(torch.from_numpy(np.stack(arr)))  # noqa: E731
    return to(starts), {a: to(v) for a, v in out.items()}


def test_loop_scores_on_the_real_environment():
    start, gen = _env_rollouts([3, 4, 5])
    m = W.loop_scores(start, gen)
    # four turns and four stays give back the start view exactly; two turns show the opposite view
    assert m["loop_psnr"] == pytest.approx(m["stay_psnr"]) and m["loop_psnr"] > 90
    assert m["half_turn_psnr"] < 40 and all(p < 40 for p in m["by_step"]["left"][:3])
    # a model that forgets where it was (shows the half-turn view after four turns) scores like a different view
    wrong = {**gen, "left": gen["left"][:, [0, 1, 2, 1]], "right": gen["right"][:, [0, 1, 2, 1]]}
    assert W.loop_scores(start, wrong)["loop_psnr"] == pytest.approx(m["half_turn_psnr"])


def _tiny(recordings, stage="stage1") -> LoadedModel:
    """A randomly initialised tiny world model, loaded as a checkpoint of `stage` would be."""
    c = C.load(TINY, ["data.name=episodes", f"data.path={recordings[0]}", "model.num_actions=4", f"stage={stage}",
                      "sample.steps=2"])
    spec = sampling_spec(c)
    return LoadedModel(randomise(build_denoiser(c.model)).eval(), spec, codec_for(c), text_encoder_for(spec, c), c)


def test_world_metrics_keys_and_an_action_blind_model(recordings, idm, tmp_path, one_thread):
    probe, _ = W.load_or_train_probe(recordings[0], tmp_path, steps=5, batch_size=16, width=8, progress=False)
    ep = load_episodes(recordings[1])
    ep = {**ep, "frames": ep["frames"][:, :4], "actions": ep["actions"][:, :4], "state": ep["state"][:, :4]}
    model = _tiny(recordings)
    m = W.world_metrics(model, ep, idm, probe, episodes=4, loop_starts=2)
    keys = {"psnr", "psnr_shuffled", "delta_psnr", "ssim", "ssim_shuffled", "psnr_by_horizon", "idm_acc",
            "idm_acc_shuffled", "idm_acc_followed_shuffled", "idm_acc_by_horizon", "idm_confusion", "probe_x_mae",
            "probe_y_mae", "probe_heading_acc", "probe_x_mae_shuffled", "probe_heading_acc_shuffled", "loop"}
    assert keys <= set(m), keys - set(m)
    assert len(m["psnr_by_horizon"]) == 3 and len(m["idm_acc_by_horizon"]) == 3 and m["episodes"] == 4
    assert m["delta_psnr"] == pytest.approx(m["psnr"] - m["psnr_shuffled"]) and m["delta_psnr"] != 0
    assert set(m["loop"]) == {"loop_psnr", "half_turn_psnr", "stay_psnr", "by_step"}
    assert len(m["loop"]["by_step"]["left"]) == 4
    json.dumps(m)  # the benchmark writes it as is
    # the same psnr as controllability (same seed, same conventions)
    ctl = W.controllability(model, ep["frames"][:4], ep["actions"][:4])
    assert ctl["psnr"] == pytest.approx(m["psnr"]) and ctl["psnr_shuffled"] == pytest.approx(m["psnr_shuffled"])
    # a model whose action table is all zeros ignores actions: both rollouts are the same clip
    with torch.no_grad():
        model.denoiser.action_embed.table.weight.zero_()
    blind = W.world_metrics(model, ep, idm, None, episodes=4, loop_starts=0)
    assert blind["delta_psnr"] == 0 and blind["idm_acc"] == blind["idm_acc_shuffled"] and blind["loop"] is None
    assert "probe_x_mae" not in blind
    with pytest.raises(ValueError, match="episodes"):
        W.world_metrics(model, ep, idm, episodes=1)


def test_bidirectional_open_loop_keeps_the_context_clean(recordings, one_thread):
    """stage0 (one block spanning the clip) samples with cached clean context frames too, so the benchmark
    can evaluate it; its context is not part of the output."""
    model = _tiny(recordings, "stage0")
    assert not model.spec.causal
    ep = load_episodes(recordings[1])
    out = W.open_loop(model, ep["frames"][:2, :4], ep["actions"][:2, :4], context=2)
    assert out.shape == (2, 2, 3, 16, 16) and torch.isfinite(out).all()
    assert out.abs().max() <= 1  # decoded through LoadedModel.decode (the identity codec clamps to [-1, 1])
    with pytest.raises(ValueError, match="the model makes"):
        W.open_loop(model, ep["frames"][:2, :4, :, :8], ep["actions"][:2, :4], context=2)


def test_minigrid_layout_rule_reads_the_true_state_from_pixels(tmp_path):
    """The colour-rule layout probe agrees with the environment: `forward` fails exactly when the rule sees no
    free cell ahead, and a successful `forward` brings the wall ahead one cell closer (or keeps it out of view)."""
    d = load_episodes(record("minigrid", tmp_path, episodes=12, frames=24, seed=5, progress=False).parent)
    lay = W.minigrid_layout(W.to_video(d["frames"]), tile=4, size=32)  # [E, F, 7, 7]
    assert lay.shape == (12, 24, 7, 7) and set(lay.unique().tolist()) <= {0, 1, 2}
    ahead = W.free_ahead(lay)  # [E, F]
    st, fwd = d["state"], d["actions"][:, 1:] == 2
    moved = (st[:, 1:, :2] != st[:, :-1, :2]).any(-1)
    assert (fwd & ~moved).any() and (fwd & moved).any()
    assert (ahead[:, :-1][fwd & ~moved] == 0).all() and (ahead[:, :-1][fwd & moved] > 0).all()
    closer = (ahead[:, 1:] == ahead[:, :-1] - 1) | (ahead[:, :-1] == 6)
    assert closer[fwd & moved].all()
    real = W.to_video(d["frames"][:, 1:])
    same = W.layout_scores(real, real, d["manifest"])
    assert same == {"layout_acc": 1.0, "ahead_mae": 0.0}
    frozen = W.layout_scores(W.to_video(d["frames"][:, :1]).expand_as(real), real, d["manifest"], "_x")
    assert frozen["layout_acc_x"] < 0.9 and frozen["ahead_mae_x"] > 0  # the world does move
    with pytest.raises(ValueError, match="do not hold"):
        W.minigrid_layout(real, tile=8, size=32)


def test_context_ceiling_geometry_and_bounds(tmp_path):
    """The one-frame layout ceiling (eval/world/ceiling.py): its view -> world geometry is right (every world
    position shown twice shows the same class, and a wrong heading breaks that), and the oracle sits between
    the frozen world and perfection because part of each later view was never shown."""
    from framecast.eval.world.ceiling import context_ceiling, view_world_coords

    d = load_episodes(record("minigrid", tmp_path, episodes=24, frames=12, seed=7, progress=False).parent)
    out = context_ceiling(d["frames"], d["state"], d["manifest"])
    assert out["seen_consistent"] == 1.0 and out["seen_frac"] > 0.1
    assert out["layout_acc_frozen"] < out["layout_acc_ceiling"] < 1.0 and 0 < out["novel_frac"] < 1
    assert abs(out["unseen_frac"] + out["seen_frac"] + out["novel_frac"] - 1) < 1e-9
    assert len(out["layout_acc_ceiling_by_h"]) == 11
    turned = d["state"].clone()
    turned[..., 2] = (turned[..., 2] + 1) % 4  # a quarter turn off: world positions no longer match
    assert context_ceiling(d["frames"], turned, d["manifest"])["seen_consistent"] < 0.95
    more = context_ceiling(d["frames"], d["state"], d["manifest"], context=4)
    assert more["novel_frac"] < out["novel_frac"]  # more context shows more of the world
    # the agent's own cell is its position, the cell straight ahead one step along its heading
    xy = view_world_coords(np.array([[5, 5, 0], [5, 5, 3]]))  # facing east, facing north
    assert xy[0, 6, 3].tolist() == [5, 5] and xy[0, 5, 3].tolist() == [6, 5] and xy[1, 5, 3].tolist() == [5, 4]
    assert xy[1, 6, 4].tolist() == [6, 5]  # right of the agent facing north is east
    with pytest.raises(ValueError, match="context"):
        context_ceiling(d["frames"], d["state"], d["manifest"], context=12)


def test_long_play_buckets_score_the_stream_against_the_real_replay(recordings, idm, tmp_path, monkeypatch, one_thread):
    """eval/world/long_play.py: buckets cover frames 1..F-1 once; a stream that IS the real replay scores layout
    1.0 and the real IDM accuracy in every bucket (so the frames and actions are aligned); a random tiny model
    streams with the play window and scores less; a restart (a jump of more than one cell) ends an episode."""
    from framecast.eval.world import long_play as LP

    root = record("minigrid", tmp_path / "long", episodes=3, frames=25, tile=2, size=16, progress=False).parent
    ep, model = load_episodes(root), _tiny(recordings)
    frames, actions = ep["frames"], ep["actions"]
    out = LP.long_play(model, frames, actions, ep["manifest"], idm=idm, bucket=10)
    assert [(r["start"], r["end"]) for r in out["buckets"]] == [(1, 11), (11, 21), (21, 25)]
    assert out["window"] == model.spec.num_frames and out["frames"] == 25 and out["episodes"] == 3
    assert all(r["layout_acc"] < 1 for r in out["buckets"])
    monkeypatch.setattr(LP, "open_loop", lambda m, f, a, **kw: W.to_video(f[:, 1:]))  # a perfect world model
    perfect = LP.long_play(model, frames, actions, ep["manifest"], idm=idm, bucket=10)
    real = W.idm_predict(idm, W.to_video(frames))  # [E, F-1]
    for r in perfect["buckets"]:
        assert r["layout_acc"] == 1.0 and r["idm_acc"] == r["real_idm_acc"]
        s, e = r["start"], r["end"]
        assert r["real_idm_acc"] == pytest.approx(float((real[:, s - 1:e - 1] == actions[:, s:e]).float().mean()))
    assert LP.drift(perfect, "layout_acc") == 0.0
    state = torch.tensor([[1, 1, 0], [2, 1, 0], [2, 1, 1], [7, 5, 0], [7, 6, 0]])
    assert LP.continuous_length(state) == 3 and LP.continuous_length(state[:3]) == 3
    with pytest.raises(ValueError, match="bucket"):
        LP.long_play(model, frames, actions, ep["manifest"], idm=idm, bucket=0)


def test_regression_check_is_deterministic_and_sees_a_changed_model(recordings, one_thread):
    """eval/world/regression.py, the shipped models' regression test: the same model scores the same twice (so
    a stored check can be compared exactly), and a changed action table moves ΔPSNR."""
    from framecast.eval.world.regression import check_scores

    model = _tiny(recordings)
    rec = {"env": "minigrid", "tile": 2, "size": 16}
    a = check_scores(model, rec, episodes=4, frames=4)
    assert a == check_scores(model, rec, episodes=4, frames=4)
    assert set(a["scores"]) == {"psnr", "psnr_shuffled", "delta_psnr", "layout_acc", "layout_acc_shuffled"}
    with torch.no_grad():
        model.denoiser.action_embed.table.weight.mul_(3.0)
    assert check_scores(model, rec, episodes=4, frames=4)["scores"]["delta_psnr"] != a["scores"]["delta_psnr"]


def test_turn_confusion_counts_left_read_as_right_and_back():
    """turn_confused: of the recorded left / right turns, the share the IDM reads as the other turn (turns read
    as forward or stay count in the denominator, not the numerator); None without both turns."""
    names = ["left", "right", "forward", "stay"]
    pred = torch.tensor([0, 1, 1, 2, 1, 0, 0, 2])  # IDM actions
    true = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2])  # recorded: 4 lefts, 2 rights
    counts = probes.confusion(pred, true, 4)
    assert counts[0] == [1, 2, 1, 0] and counts[1] == [1, 1, 0, 0]
    assert probes.turn_confusion(counts, names) == pytest.approx(3 / 6)
    assert probes.turn_confusion(probes.confusion(true, true, 4), names) == 0.0
    assert probes.turn_confusion(counts, ["stay", "fire", "up", "down"]) is None
