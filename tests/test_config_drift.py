"""A run folder continues only under the settings it was trained with, and nothing in it is written before
its lock is held and the config passed every check (recipe.train_stage, architecture.md §5); recipes check
their `--only` names and every `@<stage>` reference before any stage trains (recipe.run_recipe)."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import pytest

from framecast import config as C
from framecast import recipe as pipeline
from framecast.cli import main
from framecast.errors import CheckpointError
from framecast.recipe import split_only, train_stage
from framecast.train import checkpoint as ckpt
from framecast.train.lock import LOCK, RunLockedError, run_lock

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
CTX = multiprocessing.get_context("fork")


def tiny(out, *extra) -> C.RunConfig:
    return C.load(TINY, [f"out_dir={out}", "name=r", "train.progress=false", *extra])


def files(root: Path) -> dict[str, tuple[bytes, int]]:
    """Every file of a run folder: its bytes and mtime."""
    return {str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))
            if p.is_file()}


@pytest.fixture
def run(tmp_path):
    """A finished 2-step run (checkpoints at steps 1 and 2) and its files."""
    cfg = tiny(tmp_path, "train.steps=2", "train.ckpt_every=1")
    train_stage(cfg)
    assert not (cfg.run_dir / LOCK).exists()
    return cfg, files(cfg.run_dir)


# ------------------------------------------------------------------------------------------------
# Point 6: resuming under changed settings, or with fewer steps than done
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("change, key", [("train.lr=0.002", "train.lr"), ("data.seed=1", "data.seed"),
                                         ("train.batch_size=3", "train.batch_size")])
def test_resuming_under_a_changed_setting_is_refused_naming_the_key(run, change, key):
    cfg, before = run
    with pytest.raises(CheckpointError) as e:
        train_stage(tiny(cfg.out_dir, "train.steps=4", "train.ckpt_every=1", change))
    msg = str(e.value)
    assert key in msg and str(cfg.run_dir) in msg and "other settings" in msg and "\n" not in msg
    assert "allow" in msg  # says how to do it on purpose
    assert files(cfg.run_dir) == before


def test_every_changed_key_is_named_and_runtime_keys_are_not_settings(run):
    cfg, before = run
    with pytest.raises(CheckpointError) as e:
        train_stage(tiny(cfg.out_dir, "train.steps=4", "train.ckpt_every=1", "train.lr=0.002", "data.seed=1",
                         "train.threads=1"))
    msg = str(e.value)
    assert "train.lr" in msg and "data.seed" in msg and "train.threads" not in msg
    assert files(cfg.run_dir) == before
    # threads and progress are how a run is executed: resuming with other ones is the same run
    path = train_stage(tiny(cfg.out_dir, "train.steps=3", "train.ckpt_every=1", "train.threads=1"))
    assert path.name == "step_0000003"


def test_fewer_steps_than_done_is_refused_and_writes_nothing(run):
    cfg, before = run
    with pytest.raises(CheckpointError, match=r"holds a run of 2 steps, more than train.steps=1"):
        train_stage(tiny(cfg.out_dir, "train.steps=1", "train.ckpt_every=1"))
    assert files(cfg.run_dir) == before
    assert not (cfg.run_dir / "samples" / "step_0000001.gif").exists()


def test_a_changed_model_is_refused_even_when_changes_are_allowed(run):
    cfg, before = run
    with pytest.raises(CheckpointError, match=r"different model config.*model\.num_layers"):
        train_stage(tiny(cfg.out_dir, "train.steps=4", "train.ckpt_every=1", "model.num_layers=3"),
                    allow_change=True)
    assert files(cfg.run_dir) == before


def test_allow_change_resumes_under_the_new_settings(run, capsys):
    cfg, before = run
    changed = tiny(cfg.out_dir, "train.steps=3", "train.ckpt_every=1", "train.lr=0.002")
    path = train_stage(changed, allow_change=True)
    assert path.name == "step_0000003" and "changed settings: train.lr" in capsys.readouterr().out
    assert ckpt.read_meta(path)["config"]["train"]["lr"] == 0.002  # the new checkpoint records them
    assert C.read_yaml(cfg.run_dir / "config.yaml")["train"]["lr"] == 0.002
    for name in ("ckpt/step_0000001/model.safetensors", "ckpt/step_0000002/model.safetensors"):
        assert files(cfg.run_dir)[name] == before[name]  # the earlier checkpoints are kept as they were
    # from now on the run is one of the new settings: resuming under them needs no permission
    assert train_stage(tiny(cfg.out_dir, "train.steps=4", "train.ckpt_every=1", "train.lr=0.002")).name == \
        "step_0000004"
    with pytest.raises(CheckpointError, match="train.lr"):
        train_stage(tiny(cfg.out_dir, "train.steps=5", "train.ckpt_every=1"))


def test_a_finished_run_under_other_settings_has_nothing_to_continue(run):
    cfg, before = run
    with pytest.raises(CheckpointError, match=r"finished run with other settings \(train\.lr\)"):
        train_stage(tiny(cfg.out_dir, "train.steps=2", "train.ckpt_every=1", "train.lr=0.002"), allow_change=True)
    assert files(cfg.run_dir) == before


def test_a_recipe_stage_resumed_under_other_settings_is_refused_unless_allowed(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: rr\nbase: {TINY}\nstages:\n  stage0: {{train: {{steps: 2}}}}\n")
    out = str(tmp_path / "runs")
    pipeline.run_recipe(recipe, ["train.progress=false"], out_dir=out, health_clips=0)
    before = files(tmp_path / "runs")
    longer = ["train.progress=false", "train.steps=3", "train.lr=0.002"]
    with pytest.raises(CheckpointError, match="train.lr"):
        pipeline.run_recipe(recipe, longer, out_dir=out, health_clips=0)
    assert files(tmp_path / "runs") == before
    (result,) = pipeline.run_recipe(recipe, longer, out_dir=out, health_clips=0, allow_change=True)
    assert result.ckpt.name == "step_0000003" and not result.reused


# ------------------------------------------------------------------------------------------------
# Point 7: nothing written before the lock is held and the config is valid
# ------------------------------------------------------------------------------------------------


def _hold(folder, ready, done) -> None:
    with run_lock(folder):
        ready.set()
        done.wait(60)


def test_a_refused_second_process_changes_nothing(run, capsys):
    cfg, _ = run
    ready, done = CTX.Event(), CTX.Event()
    owner = CTX.Process(target=_hold, args=(cfg.run_dir, ready, done))
    owner.start()
    try:
        assert ready.wait(30)
        before = files(cfg.run_dir)  # with the owner's lock file
        with pytest.raises(RunLockedError) as e:
            train_stage(tiny(cfg.out_dir, "train.steps=4", "train.ckpt_every=1", "train.lr=0.5"))
        assert str(cfg.run_dir) in str(e.value) and f"process {owner.pid}" in str(e.value)
        argv = ["train", "--config", str(TINY), f"out_dir={cfg.out_dir}", "name=r", "train.steps=4"]
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "being trained by process" in err and err.count("\n") == 1
        assert files(cfg.run_dir) == before
        assert C.read_yaml(cfg.run_dir / "config.yaml")["train"]["steps"] == 2
    finally:
        done.set()
        owner.join(30)


@pytest.mark.parametrize("key, value", [("steps", -5), ("batch_size", 0), ("amp", "fp8")])
def test_a_config_that_fails_validation_changes_nothing(run, key, value):
    """Set on the built config, past the loader's own checks: train_stage refuses it before the lock."""
    cfg, before = run
    bad = tiny(cfg.out_dir, "train.steps=4", "train.ckpt_every=1")
    setattr(bad.train, key, value)
    with pytest.raises(C.ConfigError, match=f"train.{key}"):
        train_stage(bad)
    assert files(cfg.run_dir) == before
    fresh = tiny(cfg.out_dir, "name=fresh")
    setattr(fresh.train, key, value)
    with pytest.raises(C.ConfigError):
        train_stage(fresh)
    assert not fresh.run_dir.exists()  # a new run's folder is not even made


def test_other_refusals_change_nothing_either(run, capsys):
    cfg, before = run
    with pytest.raises(CheckpointError, match="no checkpoint"):
        train_stage(tiny(cfg.out_dir, "train.steps=4", f"init={cfg.out_dir}/missing"))
    argv = ["train", "--config", str(TINY), f"out_dir={cfg.out_dir}", "name=r", "train.steps=-5"]
    assert main(argv) == 2 and "train.steps" in capsys.readouterr().err
    assert files(cfg.run_dir) == before


# ------------------------------------------------------------------------------------------------
# Point 9: --only and references, checked before any stage trains
# ------------------------------------------------------------------------------------------------

RECIPE = f"""name: rc
base: {TINY}
stages:
  stage0: {{train: {{steps: 1}}}}
  stage1: {{train: {{steps: 1}}}}
"""


@pytest.fixture
def no_training(monkeypatch):
    monkeypatch.setattr(pipeline, "train_stage", lambda cfg, **kw: pytest.fail(f"{cfg.stage} trained"))


def _recipe(tmp_path, tail: str = "") -> Path:
    path = tmp_path / "rc.yaml"
    path.write_text(RECIPE + tail)
    return path


def test_split_only_separates_stage_names_from_overrides():
    assert split_only(["stage0", "cd", "train.lr=0.002", "train.threads=1"]) == \
        (["stage0", "cd"], ["train.lr=0.002", "train.threads=1"])
    assert split_only(None) == (None, [])
    assert split_only(["dmd"]) == (["dmd"], [])
    with pytest.raises(C.ConfigError, match="at least one stage name"):
        split_only(["train.lr=0.002"])


def test_only_with_unknown_names_is_refused_listing_the_stages(tmp_path, no_training):
    recipe = _recipe(tmp_path)
    for only in (["stage0", "stage2"], ["train.lr=0.002"], []):
        with pytest.raises(C.ConfigError) as e:
            pipeline.run_recipe(recipe, out_dir=str(tmp_path / "runs"), only=only)
        assert "stage0, stage1" in str(e.value)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("tail, match", [
    ('  cd: {init: "@stage1", cd: {teacher: "@nosuch", grid_steps: 8}}\n', "cd.teacher='@nosuch' names no earlier"),
    ('  cd: {init: "@dmd"}\n  dmd: {}\n', "init='@dmd' names no earlier stage"),  # a later stage
    ('  dmd: {dmd: {real: "@stage1"}}\n', "dmd.real='@stage1' is a teacher_forcing stage"),
])
def test_references_are_checked_before_any_stage_trains(tmp_path, no_training, tail, match):
    with pytest.raises(C.ConfigError, match=match) as e:
        pipeline.run_recipe(_recipe(tmp_path, tail), out_dir=str(tmp_path / "runs"))
    assert "\n" not in str(e.value)
    assert not (tmp_path / "runs").exists()  # stage0 did not train


def test_a_role_no_earlier_stage_can_fill_is_reported_up_front(tmp_path, no_training):
    path = tmp_path / "r.yaml"
    path.write_text(f"name: rc\nbase: {TINY}\nstages:\n  stage0: {{}}\n  cd: {{cd: {{grid_steps: 8}}}}\n")
    with pytest.raises(C.ConfigError, match="needs cd.teacher.*stage1 stage before it"):
        pipeline.run_recipe(path, out_dir=str(tmp_path / "runs"))
    path.write_text(f"name: rc\nbase: {TINY}\nstages:\n  cd: {{}}\n")
    with pytest.raises(C.ConfigError, match="distills an existing model"):
        pipeline.run_recipe(path, out_dir=str(tmp_path / "runs"))
    assert not (tmp_path / "runs").exists()


def test_only_trains_the_named_stage_with_the_overrides_split_from_it(tmp_path):
    recipe = _recipe(tmp_path)
    only, extra = split_only(["stage0", "train.progress=false"])
    (r0,) = pipeline.run_recipe(recipe, extra, out_dir=str(tmp_path / "runs"), only=only, health_clips=0)[:1]
    assert r0.key == "stage0" and r0.ckpt.name == "step_0000001" and r0.cfg.train.progress is False
