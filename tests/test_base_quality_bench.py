"""benchmarks/base_quality.py, the script that decides whether a retrained toy base ships: its rows carry per-clip
scores and standard errors, and a second checkpoint is compared to the first clip by clip."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tests.conftest import benchmark_module

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "base_quality.py"


@pytest.fixture(scope="module")
def bench():
    with benchmark_module("base_quality") as mod:
        yield mod


def test_paired_difference_of_a_shifted_row_is_the_shift_with_its_standard_error(bench):
    rng = np.random.default_rng(0)
    first = {"per_clip": {k: rng.uniform(size=16).tolist() for k in bench.PAIRED}}
    noise = rng.normal(0, 0.02, size=16)
    row = {"per_clip": {k: (np.asarray(v) + 0.1 + noise).tolist() for k, v in first["per_clip"].items()}}
    got = bench.paired(row, first)
    se = noise.std(ddof=1) / 4  # sqrt(16) clips
    want = f"{0.1 + noise.mean():+.3f} ±{se:.3f} ({(0.1 + noise.mean()) / se:+.1f})"
    assert got == {k: want for k in bench.PAIRED}


def test_two_checkpoints_are_scored_on_the_same_clips_and_paired(tmp_path):
    out = tmp_path / "scores.jsonl"
    r = subprocess.run([sys.executable, str(SCRIPT), "pretrained:toy-base", "pretrained:toy-base", "--clips", "3",
                        "--steps", "2", "--threads", "1", "--out", str(out)],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    printed = [json.loads(line) for line in r.stdout.strip().splitlines()]
    saved = [json.loads(line) for line in out.read_text().strip().splitlines()]
    assert len(printed) == len(saved) == 2 and "per_clip" not in printed[0] and "paired" not in printed[0]
    for row in saved:
        assert all(len(row["per_clip"][k]) == 3 for k in ("fidelity", "instruction_following"))
        assert row["fidelity"] == pytest.approx(np.mean(row["per_clip"]["fidelity"]))
        assert 0.0 < row["fidelity"] <= 1.0 and row["fidelity_se"] >= 0.0
        assert len(row["per_clip"]["speed_ratio"]) == 3 and row["speed_ratio"] >= 0.0
    # the same checkpoint, captions and noise: every clip scores the same, so each paired difference is 0
    assert all(v.startswith("+0.000 ±0.000") for v in printed[1]["paired"].values())


def test_curves_group_checkpoints_by_run_and_step_and_plot(tmp_path):
    """benchmarks/base_curves.py: rows are grouped by the run above `stage0/` and sorted by step; means and
    standard errors come from the per-clip scores; a speed ratio of a model that draws no object is left out."""
    def row(run, step, fid, recognised=1.0):
        clips = {m: [fid, fid + 0.2] for m in ("fidelity", "dynamic_degree", "motion_smoothness",
                                              "instruction_following", "speed_ratio")}
        return {"ckpt": f"runs/abl/{run}/stage0/ckpt/step_{step:07d}", "recognised": recognised, "per_clip": clips}
    scores = tmp_path / "s.jsonl"
    rows = [row("b", 2000, 0.5), row("a", 3000, 0.6), row("a", 1000, 0.2), row("c", 1000, 0.1, recognised=0.1),
            {"ckpt": "pretrained:toy-base", "per_clip": {}}]
    scores.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with benchmark_module("base_curves") as mod:
        runs = mod.parse(str(scores))
        assert list(runs) == ["a", "b", "c"] and [s for s, _ in runs["a"]] == [1000, 3000]
        mean, se = mod.stat(runs["a"][1][1], "fidelity")
        assert mean == pytest.approx(0.7) and se == pytest.approx(0.1)  # std(ddof=1) of {0.6, 0.8} / sqrt(2)
        assert np.isnan(mod.stat(runs["c"][0][1], "speed_ratio")[0]) and mod.stat(runs["c"][0][1], "fidelity")[0] > 0
    png = tmp_path / "c.png"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "base_curves.py"), str(scores), "--out", str(png)],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert png.stat().st_size > 1000 and "| a | 3000 | 0.700 ±0.100" in r.stdout
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"ckpt": "pretrained:toy-base", "per_clip": {}}) + "\n")
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "base_curves.py"), str(bad), "--out", str(png)],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode != 0 and "no row names" in r.stderr
