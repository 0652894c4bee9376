"""The stage registry (framecast/stages.py): adding a method is one objective + one record + a recipe.

This file is that method: plain flow-matching fine-tuning of a causal (teacher-forcing) model, registered
from here alone and run end to end through `framecast pipeline`, then sampled like any other stage.
"""

from pathlib import Path

import pytest
import torch

from framecast import config as C
from framecast import flow
from framecast import stages as S
from framecast.cli import main
from framecast.eval.health import LossRule
from framecast.generate import load
from framecast.models.attention import AttentionPlan
from framecast.objectives import Objective
from framecast.train import checkpoint as ckpt

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


class CausalFineTune(Objective):
    """Flow matching of a causal model under the teacher-forcing plan, one uniform sigma per video."""

    def __init__(self, model, block_size: int) -> None:
        self.model, self.plan = model, AttentionPlan("teacher_forcing", block_size)
        self.roles = {"model": model}

    def losses(self, batch, step, generator):
        x0 = batch.video  # [B, F, C, H, W]
        sigma = torch.rand(x0.shape[0], generator=generator)[:, None].expand(x0.shape[:2])  # [B, F]
        eps = torch.randn(x0.shape, generator=generator)
        v = self.model.velocity(flow.add_noise(x0, eps, sigma), sigma, batch.cond, plan=self.plan, clean=x0)
        loss = (v - flow.velocity_target(x0, eps)).pow(2).mean()
        return {"model": (loss, {"loss": loss.item()})}


def build(cfg, model, source, roles):
    return S.StagePlan(CausalFineTune(model, cfg.objective.block_size), source)


RECORD = S.Stage("finetune", ("teacher_forcing",), few_step=False, build=build, loss_rule=LossRule("no_rise"),
                 needs_init=True, help="plain flow-matching fine-tuning of a causal model")

RECIPE = f"""name: ft
base: {TINY}
stages:
  stage0: {{train: {{steps: 2}}}}
  stage1: {{train: {{steps: 2}}}}
  finetune: {{train: {{steps: 3}}}}
"""


@pytest.fixture
def registered(monkeypatch):
    monkeypatch.setitem(S.STAGES, RECORD.name, RECORD)
    return RECORD


def test_a_stage_registered_from_a_test_file_runs_through_framecast_pipeline(registered, tmp_path, one_thread,
                                                                           capsys):
    recipe = tmp_path / "ft.yaml"
    recipe.write_text(RECIPE)
    out = tmp_path / "runs"
    assert main(["pipeline", "--recipe", str(recipe), "--out", str(out), "train.progress=false"]) == 0
    assert "finetune (finetune, teacher_forcing)" in capsys.readouterr().out
    path = ckpt.resolve(out / "ft" / "finetune")
    meta = ckpt.read_meta(path)
    assert meta["stage"] == "finetune" and meta["step"] == 3 and meta["config"]["init"].endswith("step_0000002")
    assert "stage1" in meta["config"]["init"]  # initialised from the previous stage of the recipe
    m = load(path)
    assert m.spec.causal and m.spec.sampler == "euler" and m.spec.block_size == 1
    video = m.sample(["a red circle moving right slow"], num_frames=3, seed=0)
    assert video.shape == (1, 3, 3, 16, 16) and video.abs().max() <= 1
    init = ckpt.load_state_dict(ckpt.resolve(out / "ft" / "stage1"), "model")
    tuned = ckpt.load_state_dict(path, "model")
    assert any(not torch.equal(init[k], tuned[k]) for k in init)  # it trained
    # a second run reuses the finished stage rather than training it again
    assert main(["pipeline", "--recipe", str(recipe), "--out", str(out), "train.progress=false"]) == 0
    assert "finetune: finished earlier, reusing" in capsys.readouterr().out


def test_unknown_stage_and_foreign_mode_are_config_errors(registered, tmp_path):
    with pytest.raises(C.ConfigError, match="unknown stage 'nosuch'.*finetune"):
        S.get("nosuch")
    cfg = C.load(TINY, ["stage=finetune", "objective.mode=diffusion_forcing"])
    with pytest.raises(C.ConfigError, match="objective.mode='diffusion_forcing' does not apply"):
        S.mode_of(cfg)
    with pytest.raises(C.ConfigError, match="'stage0' trains the bidirectional mode"):
        S.mode_of(C.load(TINY, ["stage=stage0", "objective.mode=teacher_forcing"]))
    assert S.mode_of(C.load(TINY, ["stage=stage0"])) == "bidirectional"


def test_every_record_is_complete():
    for name, st in S.STAGES.items():
        assert st.name == name and st.modes and st.help and isinstance(st.loss_rule, LossRule)
        assert st.few_step == (st.section is not None) or name == "finetune"
        for role in st.roles:
            section, key = role.key.split(".")
            assert section == st.section and hasattr(getattr(C.RunConfig(), section), key)
            assert role.default(C.RunConfig()) in S.STAGES
