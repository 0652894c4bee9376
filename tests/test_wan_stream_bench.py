"""benchmarks/wan_stream.py at a scaled-down CPU shape (tiny preset, 64x96 pixels, a tiny Wan VAE), so the
Wan2.1-scale GPU benchmark cannot rot: every figure is in the JSON, with sane values."""

import json
from pathlib import Path

import pytest
from tests.conftest import benchmark_module

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--device", "cpu", "--preset", "tiny", "--height", "64", "--width", "96", "--frames", "8", "--window", "6",
         "--sink", "1", "--text-tokens", "8", "--peak-n", "384", "--vae", "tiny"]
FIGURES = ["latent_fps", "video_fps_no_decode", "first_frame_latency_ms", "steady_ms_per_block", "peak_mem_mib",
           "cache_mib", "model_tflops", "fraction_of_peak", "max_abs_diff_vs_kv", "context_frames_max",
           "gemm_tflops_now"]


@pytest.fixture(scope="module")
def bench():
    with benchmark_module("wan_stream") as mod:
        yield mod


def test_cpu_run_reports_every_figure(bench, one_thread, tmp_path, capsys):
    out = tmp_path / "wan_stream.json"
    assert bench.main(SMALL + ["--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["tokens_per_frame"] == (64 // 8 // 4) * (96 // 8 // 4)  # derived: pixels / VAE factor / patch
    assert res["latents"] == [16, 8, 12] and res["peak_tflops"] > 0
    caches = ["kv", "static", "static_ring"]
    assert [(r["student"], r["cache"]) for r in res["rows"]] == [(s.name, c) for s in bench.STUDENTS for c in caches]
    vae = "video_fps_decoded" in res["rows"][0]
    assert vae or res["vae"].startswith("VAE columns skipped"), res["vae"]
    for r in res["rows"]:
        assert all(k in r for k in FIGURES), sorted(set(FIGURES) - set(r))
        assert 0 < r["fraction_of_peak"] <= 1.5, r
        assert r["latent_fps"] > 0 and r["video_fps_no_decode"] > r["latent_fps"]  # 1 + 4 (F - 1) pixel frames
        assert r["first_frame_latency_ms"] > 0 and r["steady_ms_per_block"] > 0 and r["peak_mem_mib"] > 0
        assert r["context_frames_max"] == 6 - r["block_size"] + 1  # the window filled: sink + window - K
        if vae:
            assert r["decode_s"] > 0 and 0 < r["video_fps_decoded"] < r["video_fps_no_decode"]
        if r["cache"] == "static":
            assert r["max_abs_diff_vs_kv"] == 0.0  # frame order: bit for bit
        else:
            assert r["max_abs_diff_vs_kv"] < 1e-4
    table = capsys.readouterr().out
    assert table.count("\n") >= len(res["rows"]) + 2 and "%peak" in table


def test_compiled_row(bench, one_thread, tmp_path):
    """--compile adds a static_compiled row: the steady state through torch.compile ("eager" backend here, fast;
    inductor, or CUDA graphs with --compile-mode reduce-overhead, on a GPU)."""
    import torch._dynamo

    out = tmp_path / "wan_stream.json"
    try:
        assert bench.main(SMALL + ["--students", "chunkwise_4step", "--caches", "kv", "--vae", "none", "--compile",
                                   "--compile-backend", "eager", "--out", str(out)]) == 0
    finally:
        torch._dynamo.reset()
    rows = json.loads(out.read_text())["rows"]
    assert [r["cache"] for r in rows] == ["kv", "static_compiled"]
    assert rows[1]["max_abs_diff_vs_kv"] < 1e-4 and 0 < rows[1]["fraction_of_peak"] <= 1.5
