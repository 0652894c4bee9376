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
    # the same checkpoint, captions and noise: every clip scores the same, so each paired difference is 0
    assert all(v.startswith("+0.000 ±0.000") for v in printed[1]["paired"].values())
