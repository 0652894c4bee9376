import pytest

from framecast import config as C


def test_defaults_and_presets():
    cfg = C.load()
    assert cfg.model.preset == "tiny"
    big = C.model_preset("wan2.1-1.3b")
    assert (big.dim, big.num_layers, big.ffn_dim, big.patch_size) == (1536, 30, 8960, (1, 2, 2))
    assert C.model_preset("wan2.1-14b").dim == 5120


def test_yaml_and_overrides(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("model: {preset: toy, num_layers: 6}\ntrain: {lr: 1e-4, betas: [0.0, 0.999]}\n")
    cfg = C.load(p, ["train.steps=7", "objective.block_size=3", "sample.prompts=[a, b]"])
    assert cfg.model.num_layers == 6 and cfg.model.dim == 128  # preset applied, sibling key overrides it
    assert cfg.train.lr == 1e-4 and cfg.train.betas == (0.0, 0.999)
    assert cfg.train.steps == 7 and cfg.objective.block_size == 3 and cfg.sample.prompts == ["a", "b"]
    C.dump(cfg, tmp_path / "out.yaml")
    assert C.load(tmp_path / "out.yaml") == cfg


@pytest.mark.parametrize("override, words", [
    ("train.lrr=1", ["unknown config key", "train.lrr"]),
    ("bogus=1", ["unknown config key", "bogus"]),
    ("train.steps=1.5", ["train.steps", "int"]),
    ("train.progress=yes please", ["train.progress", "true/false"]),
    ("model.patch_size=[1, 2]", ["model.patch_size", "3 values"]),
    ("model.preset=huge", ["unknown model preset", "huge"]),
    ("train.steps", ["key=value"]),
])
def test_strict_errors_name_the_key(override, words):
    with pytest.raises(C.ConfigError) as e:
        C.load(None, [override])
    msg = str(e.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg


def test_bad_files(tmp_path):
    with pytest.raises(C.ConfigError, match="does not exist"):
        C.load(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {steps: [1, 2\n")
    with pytest.raises(C.ConfigError, match="not valid YAML"):
        C.load(bad)


def test_old_distill_section_is_refused_with_where_its_keys_moved(tmp_path):
    p = tmp_path / "old.yaml"
    p.write_text("distill: {teacher: runs/x, critic_ratio: 2}\n")
    with pytest.raises(C.ConfigError) as e:
        C.load(p)
    msg = str(e.value)
    assert "distill.teacher -> ode.teacher / cd.teacher" in msg and "distill.critic_ratio -> dmd.critic_ratio" in msg
    assert "\n" not in msg
    with pytest.raises(C.ConfigError, match="distill"):
        C.load(None, ["distill.grid_steps=8"])


def test_stored_configs_of_older_versions_are_upgraded():
    old = C.to_dict(C.RunConfig())
    for section in ("few_step", "ode", "cd", "dmd"):
        old.pop(section)
    old["model"].pop("codec")
    old["distill"] = {"denoising_steps": [1000, 500], "teacher": "t", "guidance": 2.5, "ode_teacher": "bidirectional",
                      "critic_ratio": 3, "dmd_sigma_min": 0.05}
    cfg = C.from_dict(C.upgrade(old))
    assert cfg.few_step.denoising_steps == [1000, 500] and cfg.ode.teacher == cfg.cd.teacher == "t"
    assert cfg.ode.guidance == cfg.cd.guidance == 2.5 and cfg.ode.teacher_kind == "bidirectional"
    assert cfg.dmd.critic_ratio == 3 and cfg.dmd.sigma_min == 0.05 and cfg.model.codec == "identity"
    assert "distill" in old  # the stored dict itself is left alone


def test_capacity_problem_names_a_patch_wider_than_the_network():
    from framecast.models.transformer import capacity_problem

    assert capacity_problem(C.model_preset("toy")) == ""  # 4x4 RGB patches: 48 values through width 128
    assert capacity_problem(C.model_preset("wan2.1-1.3b")) == ""  # 2x2 patches of 16 channels: 64 through 1536
    why = capacity_problem(C.model_preset("toy", patch_size=(1, 8, 8)))  # Breakout's first recipe
    assert "192 values" in why and "128-wide" in why and "below 0.33" in why
