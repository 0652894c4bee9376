"""framecast play without a browser: the WebSocket protocol, the session lifecycle (reset, bounded cache, cleanup on
disconnect), errors for malformed messages, the concurrent-session limit, and that the held key reaches the model.
The model is the MiniGrid student's architecture (toy preset, 32x32, 4 actions, 2-step frame-wise) with random
weights, so the action embedding is not zero and actions visibly matter."""

import json
import struct
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi", reason="framecast play needs the [play] extra: pip install -e '.[play]'")
pytest.importorskip("httpx", reason="FastAPI's TestClient needs httpx (the [dev] extra)")

from fastapi.testclient import TestClient  # noqa: E402

from framecast import config as C  # noqa: E402
from framecast.play import create_app, load_world  # noqa: E402
from framecast.stream import Session, SessionError  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def frame(msg: bytes) -> tuple[dict, torch.Tensor]:
    """Unpack one binary frame message: (header, [H, W, 3] uint8)."""
    import io

    import numpy as np
    from PIL import Image

    (n,) = struct.unpack(">I", msg[:4])
    header = json.loads(msg[4:4 + n])
    return header, torch.from_numpy(np.array(Image.open(io.BytesIO(msg[4 + n:])).convert("RGB")))


def next_frame(ws) -> tuple[dict, torch.Tensor]:
    while True:
        m = ws.receive()
        if m.get("bytes") is not None:
            return frame(m["bytes"])
        notice = json.loads(m["text"])
        assert notice["type"] != "error", notice


def next_error(ws) -> str:
    while True:
        m = ws.receive()
        if m.get("text") is not None and json.loads(m["text"])["type"] == "error":
            return json.loads(m["text"])["error"]


@pytest.fixture(scope="module")
def world(one_thread, make_student_world):
    return make_student_world()


def test_page_and_hello(world):
    with TestClient(create_app(world)) as client:
        page = client.get("/")
        assert page.status_code == 200 and "WebSocket" in page.text and "latency" in page.text
        info = client.get("/info").json()
        assert info["actions"] == ["left", "right", "forward", "stay"] and info["idle"] == "stay"
        assert info["keys"]["ArrowUp"] == "forward" and info["active_sessions"] == 0
        with client.websocket_connect("/ws") as ws:
            hello = json.loads(ws.receive_text())
            assert hello["type"] == "hello" and hello["frame_shape"] == [3, 32, 32] and hello["steps"] == 2
            h, img = next_frame(ws)  # the start frame the session was reset on
            assert h["action"] == "start" and img.shape == (32, 32, 3)
            expect = ((world.start_frame(hello["session"]) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0)
            assert torch.equal(img, expect)
            h, img = next_frame(ws)
            assert h["action"] == "stay" and h["i"] == 1 and h["gen_ms"] > 0  # no key held: the world waits


def test_held_key_is_the_next_frames_action_and_matches_a_direct_session(world):
    """The server's frames are exactly Session.step's under the actions it reports, so a key press reaches the
    model in the next frame, and different keys make different frames."""
    with TestClient(create_app(world)) as client, client.websocket_connect("/ws") as ws:
        sid = json.loads(ws.receive_text())["session"]
        next_frame(ws)  # start frame
        ws.send_text(json.dumps({"type": "action", "action": "left", "seq": 1}))
        got = []
        while len(got) < 6 or got[-1][0]["seq"] < 1:
            got.append(next_frame(ws))
        ws.send_text(json.dumps({"type": "action", "action": None, "seq": 2}))  # key released: stay again
        while got[-1][0]["seq"] < 2:
            got.append(next_frame(ws))
        got.append(next_frame(ws))
    # replay the same actions on a direct session with the same seed and start frame
    ref = Session(world.model, world.spec, text_encoder=world.text_encoder, codec=world.codec, window=world.window,
                  seed=sid)
    ref.reset(first_frame=world.start_frame(sid), seed=sid)
    acts = [h["action"] for h, _ in got]
    assert acts[0] == "stay" and "left" in acts and acts[-1] == "stay"
    assert all(h["seq"] == 1 for h, _ in got if h["action"] == "left")  # each frame names the key change it answers
    diff_left_vs_stay = []
    for h, img in got:
        x = ref.step(world.actions.index(h["action"]))  # decoded pixels: the server only quantises them
        assert x.shape == tuple(world.spec.pixel_shape) and x.min() >= -1 and x.max() <= 1
        expect = ((x + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0)
        assert (img.int() - expect.int()).abs().max() <= 1, h  # PNG is lossless; 1 level of float rounding
        assert h["cached"] <= world.window  # the rolling KV cache bounds memory
    # the action changes the frame: replay with 'stay' in place of 'left' and compare
    alt = Session(world.model, world.spec, text_encoder=world.text_encoder, codec=world.codec, window=world.window,
                  seed=sid)
    alt.reset(first_frame=world.start_frame(sid), seed=sid)
    ref.reset(first_frame=world.start_frame(sid), seed=sid)
    for h, _ in got:
        a = world.actions.index(h["action"])
        x, y = ref.step(a), alt.step(world.actions.index("stay"))
        diff_left_vs_stay.append(float((x - y).abs().mean()) if h["action"] == "left" else None)
    assert min(d for d in diff_left_vs_stay if d is not None) > 0.05


def test_malformed_messages_get_errors_and_the_session_goes_on(world):
    bad = ["not json", "[1, 2]", json.dumps({"action": "left"}), json.dumps({"type": "fly"}),
           json.dumps({"type": "action", "action": "jump"}), json.dumps({"type": "action", "action": "left", "seq": "x"}),
           json.dumps({"type": "reset", "seed": -1}), json.dumps({"type": "prompt"}), "x" * 5000]
    want = ["Expecting value", "JSON object", "JSON object", "unknown message type 'fly'", "unknown action 'jump'",
            '"seq" must be an integer', '"seed" must be a non-negative integer', '"text"', "limit 4096"]
    with TestClient(create_app(world)) as client, client.websocket_connect("/ws") as ws:
        ws.receive_text()
        for msg, w in zip(bad, want):
            ws.send_text(msg)
            assert w in next_error(ws)
        ws.send_bytes(b"\x00\x01")
        assert "binary messages" in next_error(ws)
        h0, _ = next_frame(ws)
        ws.send_text(json.dumps({"type": "action", "action": "forward", "seq": 5}))
        while True:  # still serving, and the good message after the bad ones took effect
            h, _ = next_frame(ws)
            if h["seq"] == 5:
                assert h["action"] == "forward" and h["i"] > h0["i"]
                break


def test_reset_restarts_and_session_limit_and_cleanup(world):
    app = create_app(world)
    with TestClient(app) as client:
        with client.websocket_connect("/ws") as a, client.websocket_connect("/ws") as b:
            a.receive_text(), b.receive_text()
            assert len(world.active) == 2
            with client.websocket_connect("/ws") as c:  # a third player: refused with a reason
                assert "server is full" in json.loads(c.receive_text())["error"]
                with pytest.raises(Exception):
                    c.receive_text()  # closed by the server (1013)
            for _ in range(5):
                h, _ = next_frame(a)
            assert h["i"] >= 4
            a.send_text(json.dumps({"type": "reset", "seed": 2}))
            while True:  # the reset shows the new start frame, then counts from 1 again
                h, img = next_frame(a)
                if h["action"] == "start":
                    break
            expect = ((world.start_frame(2) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0)
            assert torch.equal(img, expect)
            assert next_frame(a)[0]["i"] == 1
        # both disconnected: their sessions are gone and the slots are free again
        import time

        for _ in range(100):
            if not world.active:
                break
            time.sleep(0.05)
        assert not world.active
        with client.websocket_connect("/ws") as d:
            assert json.loads(d.receive_text())["type"] == "hello"


def test_session_frame_limit(one_thread, make_student_world):
    w = make_student_world(max_frames=3)
    with TestClient(create_app(w)) as client, client.websocket_connect("/ws") as ws:
        ws.receive_text()
        assert "frame limit 3" in next_error(ws)
        ws.send_text(json.dumps({"type": "reset", "seed": 1}))
        h, _ = next_frame(ws)
        assert h["action"] == "start"


def test_load_world_from_a_checkpoint(tmp_path, one_thread):
    """`framecast play`'s loader: action names from the recording's manifest, start frames from --start,
    refusal of bidirectional checkpoints and of recordings of the wrong size."""
    pytest.importorskip("minigrid")
    from framecast.data.envs import record
    from framecast.recipe import train_stage

    rec = tmp_path / "rec"
    record("minigrid", rec, episodes=2, frames=6, seed=0, tile=2, size=16, shard_size=2, progress=False)
    base = [f"data.path={rec}", "data.name=episodes", "model.num_actions=4", "train.steps=1", "train.warmup=0",
            "sample.steps=2", f"out_dir={tmp_path / 'runs'}"]
    tiny = ROOT / "configs" / "tiny.yaml"
    s0 = train_stage(C.load(tiny, ["stage=stage0", *base]))
    with pytest.raises(SessionError, match="bidirectional"):
        load_world(s0)
    s1 = train_stage(C.load(tiny, ["stage=stage1", f"init={s0}", *base]))
    w = load_world(s1, fps=0)
    assert w.actions == ["left", "right", "forward", "stay"] and w.keys["ArrowLeft"] == "left"
    assert w.start_frames.shape == (2, 3, 16, 16) and w.window == 4  # tiny.yaml trains 4-frame clips
    other = tmp_path / "other"
    record("minigrid", other, episodes=1, frames=2, seed=0, progress=False)  # 32x32 frames
    with pytest.raises(SessionError, match="start frames"):
        load_world(s1, start=other)


def test_a_shipped_world_model_plays_by_name_from_its_own_start_views(tmp_path, one_thread, monkeypatch):
    """`framecast play --pretrained NAME` = --model pretrained:NAME: the checksum is checked, and sessions start
    from the start views shipped beside the weights (its training recording is not on the user's machine)."""
    pytest.importorskip("minigrid")
    import shutil

    from framecast import cli, pretrained
    from framecast.data.envs import record
    from framecast.errors import CheckpointError
    from framecast.generate import convert
    from framecast.recipe import train_stage

    rec = tmp_path / "rec"
    record("minigrid", rec, episodes=2, frames=6, seed=0, tile=2, size=16, shard_size=2, progress=False)
    base = [f"data.path={rec}", "data.name=episodes", "model.num_actions=4", "train.steps=1", "train.warmup=0",
            "sample.steps=2", f"out_dir={tmp_path / 'runs'}", "stage=stage1"]
    run = train_stage(C.load(ROOT / "configs" / "tiny.yaml", base))
    root = tmp_path / "shipped"
    saved = convert(run, root / "tinyworld", use_ema=None)
    record("minigrid", root / "tinyworld" / "start", episodes=3, frames=1, seed=1, tile=2, size=16, progress=False)
    shutil.rmtree(rec)  # as on a user's machine: the training recording is gone
    monkeypatch.setattr(pretrained, "ROOT", root)
    monkeypatch.setitem(pretrained.REGISTRY, "tinyworld", pretrained.sha256(saved / pretrained.WEIGHTS))
    w = load_world("pretrained:tinyworld", fps=0)
    assert w.start_frames.shape == (3, 3, 16, 16) and w.actions == ["left", "right", "forward", "stay"]
    served = {}
    monkeypatch.setattr("framecast.play.serve", lambda model, **kw: served.update(model=model, **kw))
    assert cli.main(["play", "--pretrained", "tinyworld", "--fps", "0"]) == 0
    assert served["model"] == "pretrained:tinyworld" and served["start"] is None
    assert cli.main(["play", "--pretrained", "tinyworld", "--model", "x"]) == 2  # one of them, not both
    assert cli.main(["play"]) == 2
    monkeypatch.setitem(pretrained.REGISTRY, "tinyworld", "0" * 64)
    pretrained._verified.discard("tinyworld")
    with pytest.raises(CheckpointError, match="corrupt or was replaced"):
        load_world("pretrained:tinyworld")
