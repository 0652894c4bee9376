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
