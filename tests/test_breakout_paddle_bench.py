"""benchmarks/breakout_paddle.py: the colour rule finds Breakout's paddle band and reads the paddle from real frames."""

import json

import pytest

from tests.conftest import benchmark_module

pytest.importorskip("ale_py", reason="Breakout needs ale-py (the [world] extra)")


def test_rule_reads_the_real_paddle_and_refuses_other_recordings(tmp_path, one_thread, capsys):
    from framecast.data.envs import record

    record("breakout", tmp_path / "train", episodes=16, frames=16, seed=0, resample="max", progress=False)
    record("breakout", tmp_path / "eval", episodes=4, frames=16, seed=1, resample="max", progress=False)
    with benchmark_module("breakout_paddle") as bench:
        out = tmp_path / "paddle.json"
        assert bench.main(["--train", str(tmp_path / "train"), "--eval", str(tmp_path / "eval"), "--episodes", "4",
                           "--calibrate", "16", "--threads", "1", "--out", str(out)]) == 0
        res = json.loads(out.read_text())
        assert res["band_rows"] == [28, 29]  # screen rows 189-192 of 210, shrunk to 32
        real = res["real frames"]
        assert real["paddle_x_mae"] < 5 and real["no_paddle"] == 0 and real["two_paddles"] == 0  # RAM x spans ~200
        assert "| real frames |" in capsys.readouterr().out
        pytest.importorskip("minigrid")
        record("minigrid", tmp_path / "mg", episodes=2, frames=4, seed=0, progress=False)
        with pytest.raises(SystemExit, match="minigrid recording, not breakout"):
            bench.main(["--train", str(tmp_path / "mg"), "--eval", str(tmp_path / "eval")])
