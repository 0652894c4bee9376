"""framecast play in a real browser: headless Chromium (Debian's package, driven by Python playwright with
executable_path, never `playwright install`) loads the page, receives frames, holds keys, and the frames answer
them. The model has the MiniGrid 2-step student's architecture and random weights (tests/test_play.py), so the
fps printed here is the student's speed end to end; benchmarks/play_browser.py measures the trained student.
Skipped, with the reason, where chromium or playwright is absent; .ci/run installs both."""

import json

import pytest

pytest.importorskip("fastapi", reason="framecast play needs the [play] extra: pip install -e '.[play]'")
pytest.importorskip("playwright", reason="the browser test needs python playwright (the [browser] extra)")

from framecast.play.drive import Server, drive, find_chromium  # noqa: E402

CHROMIUM = find_chromium()
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (apt-get install chromium, or set "
                                "FRAMECAST_CHROMIUM); .ci/run installs it")


def test_page_streams_frames_and_keys_change_them(one_thread, make_student_world, tmp_path):
    world = make_student_world(window=8, fps=0.0, max_sessions=1)
    with Server(world) as server:
        r = drive(server.url, frames=150, chromium=CHROMIUM, screenshot=str(tmp_path / "page.png"),
                  script=[("", 10), ("ArrowLeft", 10), ("ArrowUp", 10), ("ArrowRight", 10)])
    print("\nbrowser:", json.dumps({k: v for k, v in r.items() if k != "canvas"}))
    assert r["frames"] >= 150 and not r["errors"]
    # every key held reached the model, and the page saw each key change answered by a frame
    assert r["actions"] == ["forward", "left", "right", "stay"]
    assert r["key_changes"] >= 6 and r["key_latency_ms_max"] < 10_000
    assert r["first_frame_ms"] is not None and r["fps"] > 0
    assert r["cached_max"] <= 8  # rolling KV cache: bounded by the window
    assert (tmp_path / "page.png").stat().st_size > 1000
    assert not world.active  # the page closed: the session was cleaned up
