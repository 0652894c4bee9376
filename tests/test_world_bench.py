"""benchmarks/world_metrics.py end to end on a tiny recipe (base, AR teacher, causal CD) trained on a small
MiniGrid recording: the JSON and table it writes, rows kept across runs, named checkpoints, and few-step stages
sampled on another step list."""

import json
from pathlib import Path

import pytest

pytest.importorskip("minigrid", reason="needs the [world] extra: pip install -e '.[world]'")

from framecast.generate import convert  # noqa: E402
from framecast.recipe import run_recipe  # noqa: E402

from .conftest import benchmark_module  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"


@pytest.fixture(scope="module")
def trained(recordings, tmp_path_factory):
    """The recordings (conftest) and a tiny run on them with stage0, stage1 and a 4-step causal CD."""
    root = tmp_path_factory.mktemp("wm_bench")
    (root / "train").symlink_to(recordings[0])
    (root / "eval").symlink_to(recordings[1])
    recipe = root / "wm.yaml"
    recipe.write_text(f"name: wm\nbase: {TINY}\nstages:\n  stage0: {{}}\n  stage1: {{init: '@stage0'}}\n"
                      "  cd: {init: '@stage1', cd: {teacher: '@stage1'}}\n")
    over = ["data.name=episodes", f"data.path={recordings[0]}", "model.num_actions=4", "train.steps=2",
            "train.warmup=0", "sample.steps=2"]
    run_recipe(recipe, over, out_dir=str(root / "runs"), health_clips=0)
    return root


@pytest.fixture(scope="module")
def bench():
    with benchmark_module("world_metrics") as module:
        yield module


def _argv(root: Path, out: Path, *stages: str) -> list[str]:
    return ["--runs", str(root / "runs" / "wm"), "--stages", *stages, "--train", str(root / "train"),
            "--eval", str(root / "eval"), "--episodes", "3", "--loop-starts", "2", "--idm-steps", "20",
            "--probe-steps", "10", "--cache", str(root / "cache"), "--out", str(out), "--no-progress"]


def test_benchmark_script_writes_json_and_table(trained, bench, tmp_path, one_thread):
    """Evaluates what exists, marks the bidirectional stage, skips the missing one, writes the ceiling/floor rows;
    a later run of one stage keeps the others; --ckpt NAME=PATH adds any checkpoint as its own row."""
    out = tmp_path / "docs" / "wm"
    assert bench.main(_argv(trained, out, "stage0", "stage1", "dmd_2step")) == 0
    result = json.loads(out.with_suffix(".json").read_text())
    assert set(result["stages"]) == {"stage0", "stage1", "dmd_2step"}
    assert "no checkpoint" in result["stages"]["dmd_2step"]["skipped"]
    assert result["stages"]["stage0"]["note"] and result["stages"]["stage1"]["note"] is None
    assert result["stages"]["stage1"]["finished"] and "idm_acc" in result["stages"]["stage1"]["metrics"]
    md = out.with_suffix(".md").read_text()
    assert "real frames (ceiling)" in md and "| stage1 | 2 |" in md and "stage0 †" in md and "dmd_2step" in md
    # a later run of one stage with the same settings keeps the others in the table
    assert bench.main(_argv(trained, out, "stage1")) == 0
    again = json.loads(out.with_suffix(".json").read_text())
    assert set(again["stages"]) == {"stage0", "stage1"} and again["stages"]["stage0"] == result["stages"]["stage0"]
    # --ckpt NAME=PATH: any checkpoint (here one step folder) as its own row
    step = sorted((trained / "runs" / "wm" / "stage1" / "ckpt").glob("step_*"))[0]
    assert bench.main([*_argv(trained, out, "stage1"), "--ckpt", f"early={step}"]) == 0
    named = json.loads(out.with_suffix(".json").read_text())
    assert named["stages"]["early"]["checkpoint"] == str(step) and "idm_acc" in named["stages"]["early"]["metrics"]
    assert "| early |" in out.with_suffix(".md").read_text()
    # a converted checkpoint (as shipped packages are) restarts its step count at 0 and is still complete
    released = convert(trained / "runs" / "wm" / "stage1", tmp_path / "released")
    assert bench.main([*_argv(trained, out, "stage1"), "--ckpt", f"early={step}", f"released={released}"]) == 0
    rows = json.loads(out.with_suffix(".json").read_text())["stages"]
    assert rows["released"]["step"] == 0 and rows["released"]["finished"]
    assert "| released | 0 |" in out.with_suffix(".md").read_text()


def test_benchmark_samples_few_step_stages_on_another_step_list(trained, bench, tmp_path, one_thread):
    """--denoising-steps re-samples a few-step stage (the causal CD model, trained on its own 4-step list) on
    another list and records the step count it used; multi-step stages stay on their Euler grid."""
    out = tmp_path / "wm"
    argv = _argv(trained, out, "stage1", "cd")
    assert bench.main(argv) == 0
    own = json.loads(out.with_suffix(".json").read_text())["stages"]
    assert bench.main([*argv, "--denoising-steps", "1000"]) == 0
    short = json.loads(out.with_suffix(".json").read_text())["stages"]
    assert own["cd"]["sampler"] == "few_step" and own["cd"]["sampling_steps"] == 4
    assert short["cd"]["sampling_steps"] == 1
    assert short["cd"]["metrics"]["psnr"] != own["cd"]["metrics"]["psnr"]  # another schedule, other frames
    assert short["stage1"]["sampling_steps"] == own["stage1"]["sampling_steps"] == 2  # Euler: untouched
    assert short["stage1"]["metrics"] == own["stage1"]["metrics"]
