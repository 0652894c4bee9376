from pathlib import Path

import pytest

from framecast import config as C


def test_quickstart_recipe_loads_strictly(tmp_path):
    r = C.load_recipe(Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml", ["train.threads=1"])
    assert [c.stage for c in r.stages] == ["stage0", "stage1"]
    assert all(c.name == "quickstart" and c.model.preset == "toy" and c.train.threads == 1 for c in r.stages)
    bad = tmp_path / "r.yaml"
    bad.write_text("base: {}\nstages: {stage0: {train: {stepz: 3}}}\n")
    with pytest.raises(C.ConfigError, match="train.stepz"):
        C.load_recipe(bad)
    bad.write_text("base: missing.yaml\nstages: {stage0: {}}\n")
    with pytest.raises(C.ConfigError, match="missing.yaml"):
        C.load_recipe(bad)
