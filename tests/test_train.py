"""Trainer, checkpoints and CLI on the tiny preset: end to end, exact resume, clear errors on bad input."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from framecast import config as C
from framecast.cli import main
from framecast.generate import load
from framecast.recipe import train_stage
from framecast.spec import SamplingSpec
from framecast.stages import normalise
from framecast.train import checkpoint as ckpt

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


def tiny(tmp_path, *extra):
    return C.load(TINY, [f"out_dir={tmp_path}", "train.progress=false", *extra])


def _weights(path):
    return ckpt.load_state_dict(ckpt.resolve(path), "model")


def test_stage0_then_stage1_end_to_end(tmp_path):
    c0 = tiny(tmp_path, "stage=stage0", "train.steps=3")
    p0 = train_stage(c0)
    c1 = tiny(tmp_path, "stage=stage1", f"init={p0}", "train.steps=3", "train.ema_decay=0.9")
    p1 = train_stage(c1)
    run = c1.run_dir
    for f in ("config.yaml", "metrics.jsonl", "loss.png", "samples/step_0000003.gif", "samples/step_0000003.mp4"):
        assert (run / f).is_file(), f
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 3 and "model/loss" in rows[-1]
    meta = ckpt.read_meta(p1)
    assert meta["stage"] == "stage1" and meta["sampling"]["causal"] and meta["sampling"]["block_size"] == 1
    assert meta["ema"] == ["model"]
    m = load(p1)
    assert m.config == normalise(c1) and m.spec == SamplingSpec.from_json(meta["sampling"])


def test_resume_is_exact(tmp_path):
    straight = tiny(tmp_path, "name=a", "train.steps=4")
    train_stage(straight)
    first = tiny(tmp_path, "name=b", "train.steps=2")
    train_stage(first)
    resumed = tiny(tmp_path, "name=b", "train.steps=4")  # same run name: picks up step 2
    train_stage(resumed)
    a, b = _weights(straight.run_dir), _weights(resumed.run_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert sorted(p.name for p in (resumed.run_dir / "ckpt").glob("step_*")) == ["step_0000002", "step_0000004"]


def test_truncated_checkpoint_gives_one_line_error(tmp_path):
    path = train_stage(tiny(tmp_path, "train.steps=1"))
    f = path / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(ckpt.CheckpointError) as e:
        load(path)
    msg = str(e.value)
    assert "model.safetensors" in msg and "corrupt or truncated" in msg and "\n" not in msg
    (path / "meta.json").write_text('{"stage": ')
    with pytest.raises(ckpt.CheckpointError, match="meta.json is corrupt"):
        load(path)


def test_checkpoints_are_never_overwritten(tmp_path):
    root = tmp_path / "ckpt"
    ckpt.save(root, 5, weights={"m": {"w": torch.ones(2)}}, meta={})
    with pytest.raises(ckpt.CheckpointError, match="refusing to overwrite"):
        ckpt.save(root, 5, weights={"m": {"w": torch.zeros(2)}}, meta={})
    assert torch.equal(ckpt.load_state_dict(root / "step_0000005", "m")["w"], torch.ones(2))


def test_resume_refuses_a_different_model(tmp_path):
    train_stage(tiny(tmp_path, "train.steps=1"))
    with pytest.raises(ckpt.CheckpointError, match="different model config"):
        train_stage(tiny(tmp_path, "train.steps=2", "model.num_layers=3"))


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["train", "--config", str(TINY), "train.lrr=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("framecast: error: unknown config key 'train.lrr'") and "\n" not in err
    assert main(["sample", "--ckpt", str(tmp_path / "missing")]) == 2
    assert "no checkpoint at" in capsys.readouterr().err


def test_cli_train_and_sample(tmp_path):
    assert main(["train", "--config", str(TINY), f"out_dir={tmp_path}", "train.steps=2"]) == 0
    out = tmp_path / "s"
    assert main(["sample", "--ckpt", str(tmp_path / "tiny" / "stage1"), "--frames", "6", "--window", "3",
                 "--out", str(out), "--num", "2"]) == 0
    assert out.with_suffix(".gif").is_file() and out.with_suffix(".mp4").is_file()


def test_console_script_entry_point_runs():
    r = subprocess.run([sys.executable, "-m", "framecast.cli", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "quickstart" in r.stdout


def test_quickstart_runs_a_tiny_recipe(tmp_path):
    from framecast.quickstart import run

    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: qs\nbase: {TINY}\nstages: {{stage0: {{train: {{steps: 2}}}}, stage1: {{train: {{steps: 2}}}}}}\n")
    report = run(recipe, ["train.progress=false", "sample.prompts=[a red circle moving right slow, a blue square]"],
                 out_dir=str(tmp_path / "runs"), eval_clips=4)
    text = report.read_text()
    assert "**match**" in text and (report.parent / "final.gif").is_file()
    data = json.loads((report.parent / "report.json").read_text())
    assert set(data["metrics"]) == {"real clips", "stage0", "stage1"}  # every stage scored next to real clips
    assert all(s["health"]["status"] in ("OK", "WARN", "FAIL") for s in data["stages"])
    assert (tmp_path / "runs" / "qs" / "stage1" / "health.json").is_file() and "health stage1" in text
    assert ckpt.read_meta(ckpt.resolve(tmp_path / "runs" / "qs" / "stage1"))["config"]["init"].endswith("step_0000002")


def test_vectors_recipe_trains(tmp_path):
    cfg = C.load(Path(__file__).resolve().parents[1] / "configs" / "vectors.yaml",
                 [f"out_dir={tmp_path}", "train.progress=false", "train.steps=3"])
    path = train_stage(cfg)
    rows = [json.loads(x) for x in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 3 and rows[-1]["model/loss"] > 0
    sm = ckpt.read_meta(path)["sampling"]
    assert sm["latent_shape"] == sm["pixel_shape"] == [2, 1, 1] and sm["codec"] == "identity"
    with pytest.raises(ValueError, match="vector videos are"):
        train_stage(C.load(None, [f"out_dir={tmp_path}", "data.name=vectors", "name=bad", "train.progress=false"]))


def test_ema_starts_as_a_copy_at_ema_start_and_resumes(tmp_path):
    """Spec §7.5: the EMA is created at ema_start from the current weights (no trace of the init) and
    updated after; a run resumed after that point keeps updating instead of restarting it."""
    from framecast.train import checkpoint as ck

    args = ["train.ema_decay=0.5", "train.ema_start=2", "train.ckpt_every=1"]
    p = train_stage(tiny(tmp_path, "train.steps=3", *args))
    root = p.parent

    def sd(step, stem):
        return ck.load_state_dict(root / f"step_{step:07d}", stem)

    for k, v in sd(3, "model").items():  # steps 0, 1: no EMA yet; step 2 (saved as 3) creates it as a copy
        torch.testing.assert_close(sd(3, "ema_model")[k], v, atol=0, rtol=0)
    straight = train_stage(tiny(tmp_path, "train.steps=5", *args, "name=straight"))
    train_stage(tiny(tmp_path, "train.steps=4", *args, "name=resumed"))
    resumed = train_stage(tiny(tmp_path, "train.steps=5", *args, "name=resumed"))
    for k, v in ck.load_state_dict(straight, "ema_model").items():
        torch.testing.assert_close(ck.load_state_dict(resumed, "ema_model")[k], v, atol=0, rtol=0)
    m5, e5, m4 = (ck.load_state_dict(straight, "model"), ck.load_state_dict(straight, "ema_model"),
                  ck.load_state_dict(straight.parent / "step_0000004", "ema_model"))
    k = next(iter(m5))
    torch.testing.assert_close(e5[k], 0.5 * m4[k] + 0.5 * m5[k], atol=1e-6, rtol=0)


def test_a_run_directory_is_trained_by_one_process_at_a_time(tmp_path):
    import os
    import subprocess
    import sys

    from framecast.train.loop import run_lock

    with run_lock(tmp_path):
        with pytest.raises(RuntimeError, match=f"being trained by process {os.getpid()}"):
            with run_lock(tmp_path):
                pass
    assert not (tmp_path / ".lock").exists()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / ".lock").write_text(dead.stdout.strip())  # a lock left by a process that has exited
    with run_lock(tmp_path):
        assert (tmp_path / ".lock").read_text() == str(os.getpid())


def test_cosine_learning_rate_schedule(tmp_path):
    """train.lr_schedule=cosine: linear warm-up, then a half cosine from lr to lr * lr_final at the last step;
    the optimiser really runs it, and a resumed run continues the same curve (the schedule is a function of
    the step only)."""
    import math

    from framecast.train.loop import lr_scale

    assert [lr_scale(s, 100, 10) for s in (0, 4, 9, 50, 99)] == [0.1, 0.5, 1.0, 1.0, 1.0]  # constant
    assert lr_scale(9, 100, 10, "cosine", 0.1) == 1.0 and lr_scale(10, 100, 10, "cosine", 0.1) == 1.0
    assert lr_scale(99, 100, 10, "cosine", 0.1) == pytest.approx(0.1)
    mid = 10 + (99 - 10) / 2
    assert lr_scale(int(mid), 100, 10, "cosine", 0.0) == pytest.approx(0.5 * (1 + math.cos(math.pi * int(mid - 10) / 89)))
    vals = [lr_scale(s, 100, 10, "cosine", 0.0) for s in range(10, 100)]
    assert all(a >= b for a, b in zip(vals, vals[1:]))  # monotone after warm-up
    held = [lr_scale(s, 100, 10, "cosine", 0.1, hold=40) for s in range(100)]  # warm-up, 40 steps at 1, decay
    assert held[:10] == [lr_scale(s, 100, 10) for s in range(10)] and set(held[10:50]) == {1.0}
    assert held[51] < 1.0 and held[99] == pytest.approx(0.1)  # the cosine runs from step 50 to the last, 99
    assert held[74] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 24 / 49)))
    bad_hold = ["train.steps=100", "train.warmup=10", "train.lr_hold=89", "train.lr_schedule=cosine"]
    with pytest.raises(C.ConfigError, match="train.lr_hold.*no step of train.steps"):  # refused at load
        C.load(TINY, bad_hold)
    assert C.load(TINY, bad_hold[:-1]).train.lr_hold == 89  # a constant rate has no decay to leave room for
    with pytest.raises(C.ConfigError, match="train.lr_schedule"):
        C.load(TINY, ["train.lr_schedule=linear"])
    ov = [f"out_dir={tmp_path}", "train.steps=6", "train.lr_schedule=cosine", "train.lr_final=0.25", "train.warmup=0"]
    cos = train_stage(C.load(TINY, ov + ["name=a"]))
    const = train_stage(C.load(TINY, ov + ["name=b", "train.lr_schedule=constant"]))
    from framecast.recipe import finished
    from framecast.train import checkpoint as ck

    a, b = ck.load_state_dict(cos, "model"), ck.load_state_dict(const, "model")
    assert not all(torch.equal(a[k], b[k]) for k in a)  # the schedule reached the optimiser
    held = ck.load_state_dict(train_stage(C.load(TINY, ov + ["name=h", "train.lr_hold=4"])), "model")
    assert not any(all(torch.equal(held[k], o[k]) for k in held) for o in (a, b))  # and so did the hold
    # train.steps sets a cosine curve, so a finished cosine run is not silently continued further
    with pytest.raises(ckpt.CheckpointError, match="train.steps"):
        train_stage(C.load(TINY, ov + ["name=a", "train.steps=8"]))
    assert finished(C.load(TINY, ov + ["name=b", "train.lr_schedule=constant", "train.steps=8"])) is None


def test_quickstart_starts_from_the_shipped_base_unless_from_scratch(monkeypatch):
    """The quickstart recipe's Stage 0 is the shipped base; --from-scratch clears `use:` (so Stage 0 trains with
    the recipe's settings) under another run name, so the two never mix their runs."""
    import framecast.quickstart as Q

    r = C.load_recipe(Q.RECIPE)
    assert r.stages[0].stage == "stage0" and r.stages[0].use == "pretrained:toy-base"
    seen = []
    monkeypatch.setattr(Q, "run", lambda recipe, overrides, **kw: seen.append(list(overrides)))
    assert main(["quickstart", "train.threads=1"]) == 0
    assert main(["quickstart", "--from-scratch", "train.threads=1"]) == 0
    assert seen == [["train.threads=1"], ["use=", "name=quickstart_scratch", "train.threads=1"]]
    scratch = C.load_recipe(Q.RECIPE, seen[1])
    assert scratch.stages[0].use == "" and scratch.stages[0].train.steps == 750
    assert {c.name for c in scratch.stages} == {"quickstart_scratch"}
