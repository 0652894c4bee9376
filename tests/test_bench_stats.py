"""The statistics of `framecast bench`: per-clip standard errors and paired differences (framecast/bench.py),
against values computed by hand."""

import math

import numpy as np
import pytest

from framecast import bench
from framecast.eval import toy as T


def test_standard_error_is_sample_std_over_sqrt_n():
    a = np.array([0.0, 1.0, 2.0, 3.0])  # sample variance 5/3
    assert T.standard_error(a) == pytest.approx(math.sqrt(5 / 3) / 2)
    assert math.isnan(T.standard_error(np.array([0.7])))


def test_paired_difference_removes_the_shared_clip_effect():
    clip_effect = np.linspace(0.0, 0.8, 64)  # captions differ in difficulty; both methods see the same ones
    a, b = clip_effect + 0.05, clip_effect.copy()
    b[::2] += 0.01  # b is a little better on half the clips
    diff, se = bench.paired_difference(a.tolist(), b.tolist())
    assert diff == pytest.approx(0.045)
    assert se == pytest.approx(np.std(a - b, ddof=1) / 8)
    assert se < 0.1 * math.hypot(T.standard_error(a), T.standard_error(b))  # far tighter than unpaired
    with pytest.raises(ValueError, match="differ in number"):
        bench.paired_difference([0.1, 0.2], [0.1])


def test_comparisons_cover_the_evaluated_pairs_and_write_one_row_each(tmp_path):
    rng = np.random.default_rng(0)

    def row(stage, shift):
        return {"stage": stage, "key": stage, "per_clip": {k: (rng.random(32) * 0.1 + shift).tolist() for k in bench.METRICS}}
    rows = [row("dmd_2step", 0.6), row("dmd_sf_2step", 0.2), row("dmd_1step", 0.5)]  # no dmd_sf_1step here
    comps = bench.comparisons(rows)
    assert [(c["a"], c["b"]) for c in comps] == [("dmd_2step", "dmd_sf_2step"), ("dmd_2step", "dmd_1step")]
    first = comps[0]["fidelity"]
    assert first["diff"] == pytest.approx(np.mean(np.subtract(rows[0]["per_clip"]["fidelity"],
                                                              rows[1]["per_clip"]["fidelity"])))
    assert first["z"] == pytest.approx(first["diff"] / first["se"]) and first["z"] > 3
    path = tmp_path / "results.md"
    path.write_text("table\n")
    bench.write_comparisons(rows, path)
    text = path.read_text()
    assert text.startswith("table\n") and text.count("\n| ") == 1 + len(comps)
    assert f"{first['diff']:+.3f} ±{first['se']:.3f}" in text
