import json
from pathlib import Path

import pytest

from framecast import config as C
from framecast.models.transformer import capacity_problem
from framecast.train.checkpoint import CorruptCheckpoint


def test_quickstart_recipe_loads_strictly(tmp_path):
    r = C.load_recipe(Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml", ["train.threads=1"])
    assert [c.stage for c in r.stages] == ["stage0", "stage1", "cd", "dmd"]  # the full CF++ 2-step pipeline
    assert r.stages[-1].few_step.denoising_steps == [1000, 500]
    assert all(c.name == "quickstart" and c.model.preset == "toy" and c.train.threads == 1 for c in r.stages)
    bad = tmp_path / "r.yaml"
    bad.write_text("base: {}\nstages: {stage0: {train: {stepz: 3}}}\n")
    with pytest.raises(C.ConfigError, match="train.stepz"):
        C.load_recipe(bad)
    bad.write_text("base: missing.yaml\nstages: {stage0: {}}\n")
    with pytest.raises(C.ConfigError, match="missing.yaml"):
        C.load_recipe(bad)


CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("name", ["toy_framewise_1step", "toy_framewise_2step", "toy_framewise_4step",
                                  "toy_chunkwise_4step", "toy_causal_ode_2step", "toy_sf_baseline_2step"])
def test_toy_recipes_load_and_share_their_common_stages(name):
    r = C.load_recipe(CONFIGS / f"{name}.yaml")
    kinds = [c.stage for c in r.stages]
    assert kinds[0] == "stage0" and kinds[-1] == "dmd" and set(kinds) <= {"stage0", "stage1", "ode", "cd", "dmd"}
    dmd = r.stages[-1]
    assert dmd.run_dir.name == dmd.tag and dmd.tag.startswith("dmd")  # the key names the run directory
    assert dmd.init.startswith("@")  # DMD starts from the named Stage-2 checkpoint
    steps = {"1step": [1000], "2step": [1000, 500], "4step": [1000, 750, 500, 250]}[name.rsplit("_", 1)[1]]
    assert dmd.few_step.denoising_steps == steps
    if steps != [1000, 750, 500, 250]:  # 1/2-step models denoise the first frame with 4 steps (method.md §7.6)
        assert dmd.few_step.first_block_steps == [1000, 750, 500, 250]
    # stages with the same key are the same run in every recipe (pipeline reuses them only if identical)
    base = {c.tag or c.stage: C.to_dict(c) for c in C.load_recipe(CONFIGS / "toy_framewise_2step.yaml").stages}
    for c in r.stages:
        if (c.tag or c.stage) in base:
            assert C.to_dict(c) == base[c.tag or c.stage], c.tag or c.stage


def _resolved(path):
    """A recipe's stages with every `@ref` and default filled as `framecast pipeline` fills them."""
    from framecast.recipe import StageResult, resolve_refs

    done = {}
    for cfg in C.load_recipe(path).stages:
        key = cfg.tag or cfg.stage
        cfg = resolve_refs(cfg, done, key)
        done[key] = StageResult(key, cfg, cfg.run_dir / "ckpt", 0.0, False)
    return {k: C.to_dict(r.cfg) for k, r in done.items()}


def test_bench_recipe_reuses_the_toy_recipes_stages():
    """configs/bench_toy.yaml names every init and teacher; resolved, each stage it shares with a toy_* recipe is
    the identical run, so `framecast bench toy` reuses what those recipes trained (and the reverse)."""
    bench = _resolved(CONFIGS / "bench_toy.yaml")
    shared = set()
    for name in ("toy_framewise_1step", "toy_framewise_2step", "toy_framewise_4step", "toy_chunkwise_4step",
                 "toy_causal_ode_2step", "toy_sf_baseline_2step"):
        for key, cfg in _resolved(CONFIGS / f"{name}.yaml").items():
            assert bench[key] == cfg, (name, key)
            shared.add(key)
    assert set(bench) - shared == {"stage1_df", "dmd_ode_1step", "dmd_sf_1step", "cd_df", "dmd_df_2step",
                                   "cd_bnd", "dmd_bnd_2step"}
    assert "/stage1_df/" in bench["cd_df"]["cd"]["teacher"] and "/stage1/" in bench["cd"]["cd"]["teacher"]
    from framecast.bench import METHODS
    assert {m.stage for m in METHODS if m.stage} <= set(bench)


def test_recipe_stage_key_and_kind(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("name: r\nstages: {stage0: {}, dmd_fast: {stage: dmd, few_step: {denoising_steps: [1000]}}}\n")
    r = C.load_recipe(p)
    assert [(c.stage, c.tag) for c in r.stages] == [("stage0", ""), ("dmd", "dmd_fast")]
    assert r.stages[1].run_dir == Path("runs") / "r" / "dmd_fast" and r.stages[0].run_dir.name == "stage0"
    p.write_text("name: r\nstages: {x: {stage: nosuch}}\n")
    from framecast.stages import mode_of
    with pytest.raises(C.ConfigError, match="nosuch"):
        mode_of(C.load_recipe(p).stages[0])


@pytest.mark.parametrize("env, size", [("minigrid", 32), ("breakout", 32)])
def test_world_model_recipes_are_action_conditioned_frame_wise_pipelines(env, size):
    """One recipe per environment: the teacher, AR teacher, causal CD, the 1- and 2-step students and the
    bidirectional-init (Self Forcing) baseline, all on the recording's actions (4, incl. 'stay')."""
    r = C.load_recipe(CONFIGS / f"{env}.yaml")
    stages = {c.tag or c.stage: c for c in r.stages}
    assert [c.stage for c in r.stages] == ["stage0", "stage1", "cd", "dmd", "dmd", "ode", "dmd"]
    assert all(c.model.num_actions == 4 and c.data.name == "episodes" and c.data.height == size for c in r.stages)
    assert stages["dmd_2step"].few_step.denoising_steps == [1000, 500]
    assert stages["dmd_1step"].few_step.denoising_steps == [1000]
    assert stages["ode_sf"].ode.teacher_kind == "bidirectional" and stages["stage1"].objective.block_size == 1
    tokens = (size // r.stages[0].model.patch_size[1]) ** 2
    assert tokens == 64
    # each token's values fit through the network's width (Breakout's first 64-px, 8x8-patch recipe did not)
    assert all(capacity_problem(c.model) == "" for c in r.stages)


def test_use_stage_stands_in_for_a_trained_one(tmp_path):
    """`stage0: {use: <checkpoint>}` trains nothing: later stages start from that checkpoint and name it as
    written (so their identity does not depend on where it lives), its health is sample-only, and clearing it
    (`use=`) trains the stage as usual. A checkpoint of another network or generator mode is refused."""
    from framecast.recipe import run_recipe
    from framecast.train import checkpoint as ckpt

    tiny = CONFIGS / "tiny.yaml"
    r0 = run_recipe(_write(tmp_path / "b.yaml", f"name: b\nbase: {tiny}\nstages: {{stage0: {{train: {{steps: 2}}}}}}"),
                    ["train.progress=false"], out_dir=str(tmp_path / "runs"), health_clips=0)
    base = str(r0[0].ckpt)
    recipe = _write(tmp_path / "r.yaml", f"name: r\nbase: {tiny}\nstages: {{stage0: {{use: {base}}}, "
                                         f"stage1: {{train: {{steps: 2}}}}}}")
    done = run_recipe(recipe, ["train.progress=false"], out_dir=str(tmp_path / "runs"), health_clips=2)
    assert done[0].reused and done[0].ckpt == ckpt.resolve(base) and done[0].ref == base
    assert not (tmp_path / "runs" / "r" / "stage0" / "ckpt").exists()  # nothing trained there
    assert ckpt.resolve(tmp_path / "runs" / "r" / "stage0") == ckpt.resolve(base)  # its run dir loads as the base
    (tmp_path / "runs" / "r" / "stage0" / ckpt.USED).write_text("{not json")
    with pytest.raises(CorruptCheckpoint, match="used.json is corrupt"):
        ckpt.resolve(tmp_path / "runs" / "r" / "stage0")
    (tmp_path / "runs" / "r" / "stage0" / ckpt.USED).write_text(json.dumps({"use": str(tmp_path / "runs" / "r" / "stage0")}))
    with pytest.raises(CorruptCheckpoint, match="not another checkpoint"):
        ckpt.resolve(tmp_path / "runs" / "r" / "stage0")
    ckpt.write_used(tmp_path / "runs" / "r" / "stage0", base)
    assert [c.name for c in done[0].health.checks] == ["not noise", "objects present", "moves"]  # no loss log
    assert ckpt.read_meta(done[1].ckpt)["config"]["init"] == base
    scratch = run_recipe(recipe, ["train.progress=false", "use=", "name=r2"], out_dir=str(tmp_path / "runs"),
                         health_clips=0)
    assert not scratch[0].reused and (tmp_path / "runs" / "r2" / "stage0" / "ckpt").is_dir()
    ckpt.write_used(tmp_path / "runs" / "r2" / "stage0", base)  # a stale pointer never hides a trained stage
    assert ckpt.resolve(tmp_path / "runs" / "r2" / "stage0") == scratch[0].ckpt
    other = _write(tmp_path / "o.yaml", f"name: o\nbase: {tiny}\nstages: {{stage0: {{use: {base}, model: "
                                        f"{{num_layers: 3}}}}}}")
    with pytest.raises(C.ConfigError, match=r"another network .*model.num_layers"):
        run_recipe(other, ["train.progress=false"], out_dir=str(tmp_path / "runs"), health_clips=0)
    # a zero-initialised addition the recipe turns on is no other network: the later stage starts from the base
    spatial = _write(tmp_path / "s.yaml", f"name: s\nbase: {tiny}\nstages: {{stage0: {{use: {base}}}, "
                                          f"stage1: {{train: {{steps: 2}}}}}}")
    grown = run_recipe(spatial, ["train.progress=false", "model.spatial_embed=true"], out_dir=str(tmp_path / "runs"),
                       health_clips=0)
    assert grown[0].reused and ckpt.read_meta(grown[1].ckpt)["config"]["model"]["spatial_embed"] is True
    causal = str(done[1].ckpt)
    wrong = _write(tmp_path / "w.yaml", f"name: w\nbase: {tiny}\nstages: {{stage0: {{use: {causal}}}}}")
    with pytest.raises(C.ConfigError, match="is a teacher_forcing model; the stage is bidirectional"):
        run_recipe(wrong, ["train.progress=false"], out_dir=str(tmp_path / "runs"), health_clips=0)


def _write(path, text):
    path.write_text(text + "\n")
    return path


def test_a_recipe_extends_another_stage_by_stage(tmp_path):
    """`extends: parent.yaml`: the parent's base and stages, this file's base merged over the parent's and each of
    its stages over the parent's stage of the same key (untouched keys kept), new stages after the parent's."""
    parent = _write(tmp_path / "p.yaml", "name: p\nbase: {train: {lr: 1.0e-3, steps: 5}}\n"
                    "stages: {stage0: {train: {steps: 7, warmup: 3}}, stage1: {init: '@stage0'}}")
    child = _write(tmp_path / "c.yaml", "name: c\nextends: p.yaml\nbase: {train: {lr: 2.0e-3}}\n"
                   "stages: {stage0: {train: {steps: 9}}, dmd: {init: '@stage1'}}")
    r = C.load_recipe(child)
    assert [c.stage for c in r.stages] == ["stage0", "stage1", "dmd"] and all(c.name == "c" for c in r.stages)
    s0, s1 = r.stages[0], r.stages[1]
    assert (s0.train.steps, s0.train.warmup, s0.train.lr) == (9, 3, 2.0e-3)  # the child's steps, the parent's warmup
    assert (s1.train.steps, s1.init) == (5, "@stage0")
    assert C.load_recipe(parent).stages[0].train.lr == 1.0e-3  # the parent is unchanged
    _write(tmp_path / "loop.yaml", "extends: loop.yaml\nstages: {stage0: {}}")
    with pytest.raises(C.ConfigError, match="extends itself"):
        C.load_recipe(tmp_path / "loop.yaml")
    _write(tmp_path / "bad.yaml", "extends: p.yaml\nstages: {stage0: {train: {stepz: 1}}}")
    with pytest.raises(C.ConfigError, match="train.stepz"):
        C.load_recipe(tmp_path / "bad.yaml")
    _write(tmp_path / "none.yaml", "extends: nosuch.yaml\nstages: {}")
    with pytest.raises(C.ConfigError, match="nosuch.yaml"):
        C.load_recipe(tmp_path / "none.yaml")


def test_minigrid_long_is_the_minigrid_recipe_with_a_larger_budget():
    base, long = (C.load_recipe(CONFIGS / f"{n}.yaml") for n in ("minigrid", "minigrid_long"))
    assert [c.tag or c.stage for c in long.stages] == [c.tag or c.stage for c in base.stages]
    for a, b in zip(base.stages, long.stages):
        assert b.train.steps >= a.train.steps and b.model == a.model and b.train.lr == a.train.lr


def test_only_leaves_an_unfinished_stage_alone_unless_a_named_stage_starts_from_it(tmp_path):
    """`--only b` trains b from stage0 while stage1 (unfinished, read by nobody in --only) is left alone; a stage
    of --only whose default init would be the unfinished stage is refused, naming it."""
    from framecast.recipe import run_recipe

    tiny = CONFIGS / "tiny.yaml"
    recipe = _write(tmp_path / "r.yaml", f"name: r\nbase: {tiny}\nstages: {{stage0: {{train: {{steps: 2}}}}, "
                                         "stage1: {train: {steps: 2}}, c: {stage: stage1, train: {steps: 2}}, "
                                         "b: {stage: stage1, init: '@stage0', train: {steps: 2}}}")
    kw = dict(out_dir=str(tmp_path / "runs"), health_clips=0)
    run_recipe(recipe, ["train.progress=false"], only=["stage0"], **kw)
    done = run_recipe(recipe, ["train.progress=false"], only=["b"], **kw)
    assert [d.key for d in done] == ["stage0", "b"] and not (tmp_path / "runs" / "r" / "stage1" / "ckpt").exists()
    from framecast.train import checkpoint as ckpt

    assert ckpt.read_meta(done[1].ckpt)["config"]["init"] == str(done[0].ckpt)
    with pytest.raises(C.ConfigError, match="stage 'stage1' is not finished .* stage 'c' starts from it"):
        run_recipe(recipe, ["train.progress=false"], only=["c"], **kw)  # c's init defaults to the previous stage


def test_every_shipped_config_fits_its_patches_through_its_width():
    """No recipe trains a network whose output cannot hold a token's values (models/transformer.capacity_problem:
    the loss would floor above zero at any step count). tiny.yaml is the tests' model, never trained for quality."""
    import yaml

    paths = [p for p in sorted(CONFIGS.rglob("*.yaml")) if p.name != "tiny.yaml"]
    assert len(paths) > 20
    for p in paths:
        data = yaml.safe_load(p.read_text())
        cfgs = C.load_recipe(p).stages if {"stages", "extends"} & set(data) else [C.load(p)]
        assert [capacity_problem(c.model) for c in cfgs] == [""] * len(cfgs), p
