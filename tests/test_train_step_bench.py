"""benchmarks/train_step.py at a CPU shape (tiny preset, 4 latent frames of 8x8), so the Wan2.1-scale GPU benchmark
cannot rot: one process and one torchrun launch (FSDP2 on gloo) report every figure, and its FLOP accounting
agrees with torch's own count of the matmuls of a step."""

import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from tests.conftest import benchmark_module

ROOT = Path(__file__).resolve().parents[1]
LOCAL = {"GLOO_SOCKET_IFNAME": "lo"}  # gloo over loopback: no dependence on the host name resolving
SCRIPT = ROOT / "benchmarks" / "train_step.py"
SMALL = ["--device", "cpu", "--preset", "tiny", "--frames", "4", "--height", "8", "--width", "8", "--text-tokens",
         "8", "--steps", "1", "--peak-n", "256"]
FIGURES = ["step_s_median", "step_s", "peak_mem_mib", "memory_kind", "params_trained", "params_frozen",
           "model_tflop_per_step", "model_tflops", "fraction_of_peak", "fsdp2", "last_logs"]


@pytest.fixture(scope="module")
def bench():
    with benchmark_module("train_step") as mod:
        yield mod


def check(res: dict) -> None:
    assert [r["stage"] for r in res["rows"]] == ["stage1", "cd", "dmd"]
    assert res["tokens_per_frame"] == (8 // 4) * (8 // 4) and res["video_tokens"] == 4 * 4  # tiny's 4x4 patch
    assert res["world_size"] == 1 and res["gemm_tflops_before"] > 0 and res["gemm_tflops_after"] > 0
    assert res["peak_tflops"] == max(res["gemm_tflops_before"], res["gemm_tflops_after"])
    rows = {r["stage"]: r for r in res["rows"]}
    for r in rows.values():
        assert all(k in r for k in FIGURES), sorted(set(FIGURES) - set(r))
        assert len(r["step_s"]) == 1 and r["step_s_median"] > 0 and r["peak_mem_mib"] > 0
        assert r["model_tflop_per_step"] > 0 and 0 < r["fraction_of_peak"] <= 1.5, r
        assert all(math.isfinite(v) for v in r["last_logs"].values()), r["last_logs"]  # finite losses
    n = rows["stage1"]["params_trained"]  # one network; every other is the same architecture
    assert n > 0 and rows["stage1"]["params_frozen"] == 0
    assert rows["cd"]["params_trained"] == n and rows["cd"]["params_frozen"] == 2 * n  # teacher + target
    assert rows["dmd"]["params_trained"] == 2 * n and rows["dmd"]["params_frozen"] == n  # model + critic; real
    assert sorted(rows["dmd"]["last_logs"]) == ["critic/loss", "model/loss"]  # critic_ratio 1: both trained


def test_cpu_run_reports_every_figure(bench, one_thread, tmp_path, capsys):
    out = tmp_path / "train_step.json"
    assert bench.main(SMALL + ["--out", str(out)]) == 0
    res = json.loads(out.read_text())
    check(res)
    assert not res["torchrun"] and not any(r["fsdp2"] for r in res["rows"]) and res["dtype"] == "torch.float32"
    assert res["device"] == "cpu" and "loadavg_1min" in res and res["torch"] == torch.__version__
    table = capsys.readouterr().out
    assert table.count("\n") >= 5 and "%peak" in table and "dmd" in table


def test_flop_accounting_matches_torch_flop_counter(bench, one_thread):
    """Without gradient checkpointing (whose recomputation MFU does not count) a step's matmul FLOPs, as torch's
    FlopCounterMode counts them (SDPA's math kernel, so attention is counted too), are the accounting's within 5 %:
    the 3x backward rule, CFG's doubled batch, CD's three networks and DMD's rollout at its drawn exit steps."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from framecast.train.distributed import SINGLE
    from framecast.train.loop import Trainer

    args = bench.parse(SMALL + ["--channels", "16", "--height", "16", "--width", "16", "--no-checkpointing"])
    for stage in bench.STAGES:
        cfg = bench.run_config(args, stage)
        plan, _ = bench.build(cfg, SINGLE, torch.device("cpu"))
        with tempfile.TemporaryDirectory() as run_dir:
            trainer = Trainer(cfg, plan.objective, plan.source, run_dir=run_dir, meta={}, optim=plan.optim)
            for step in range(2):  # DMD draws another exit step at step 1 here
                with sdpa_kernel([SDPBackend.MATH]), FlopCounterMode(display=False) as fc:
                    trainer._step(step)
                counted = bench.step_flops(cfg, plan.objective, trainer, step)
                assert abs(fc.get_total_flops() / counted - 1) < 0.05, (stage, step, fc.get_total_flops(), counted)


def test_torchrun_one_process_shards_with_fsdp2(tmp_path):
    out = tmp_path / "train_step.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", str(SCRIPT),
           *SMALL, "--out", str(out)]
    env = {**LOCAL, **os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    r = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    check(res)
    assert res["torchrun"] and all(r["fsdp2"] for r in res["rows"])  # every block of every network: FSDPModule
    assert "FSDP2" in r.stdout
