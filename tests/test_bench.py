"""`framecast bench toy --smoke`: every stage of the benchmark recipe a few steps long, then the whole
evaluation path. Opt-in (minutes): python -m pytest -m slow tests/test_bench.py"""

import json

import pytest

from framecast import bench
from framecast.cli import main

pytestmark = pytest.mark.slow


def test_bench_smoke_writes_a_full_table(tmp_path):
    assert main(["bench", "toy", "--smoke", "--out", str(tmp_path), "--threads", "1", "train.progress=false"]) == 0
    root = tmp_path / "bench_smoke" / "bench"
    data = json.loads((root / "results.json").read_text())
    labels = [r["method"] for r in data["rows"]]
    assert labels == [m.label for m in bench.METHODS]  # every method trained and evaluated
    for r in data["rows"]:
        for k in bench.METRICS:
            assert 0.0 <= r[k] <= 1.0, (r["method"], k)
        assert r["fd"] >= 0
        if r["stage"]:
            assert r["first_frame_ms"] > 0 and r["fps"] > 0
    real = data["rows"][0]
    assert real["fidelity"] > 0.95 and real["dynamic_degree"] == 1.0  # the ceiling row is real data
    # the SF / CF / CF++ rows carry their Stage-2 and Stage-3 costs
    assert all(r["stage2_s"] > 0 and r["stage3_s"] > 0 for r in data["rows"] if "DMD" in r["method"])
    table, paired = (root / "results.md").read_text().split("Paired differences")
    assert table.count("\n| ") == len(labels) + 1
    assert paired.count("\n| ") == len(bench.COMPARISONS) + 1  # every ordering's row, after its header
    assert [c["claim"] for c in data["comparisons"]] == [c[2] for c in bench.COMPARISONS]
    assert all(len(r["per_clip"]["fidelity"]) == data["clips"] for r in data["rows"])
    assert (root / "grid.gif").stat().st_size > 10_000
