import pytest
import torch

from framecast import config as C
from framecast.data.batch import Batch
from framecast.models.conditioning import Cond
from framecast.objectives.diffusion import FlowMatching


def _batch(B=2, F=4):
    return Batch(torch.randn(B, F, 3, 8, 8), Cond(torch.randn(B, 4, 32)), Cond(torch.zeros(B, 4, 32)), [""] * B)


@pytest.mark.parametrize("mode", ["bidirectional", "teacher_forcing", "diffusion_forcing"])
def test_flow_matching_losses_and_gradients(tiny_model, mode):
    tiny_model.train()
    obj = FlowMatching(tiny_model, C.FlowConfig(), C.ObjectiveConfig(mode=mode, block_size=2))
    out = obj.losses(_batch(), 0, torch.Generator().manual_seed(0))
    loss, logs = out["model"]
    assert torch.isfinite(loss) and loss.ndim == 0 and set(logs) == {"loss", "mse"}
    loss.backward()
    grads = [p.grad for p in tiny_model.parameters()]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)


def test_teacher_forcing_uses_clean_context(tiny_model, monkeypatch):
    seen = {}
    orig = tiny_model.velocity

    def spy(x, sigma, cond, **kw):
        seen.update(kw)
        return orig(x, sigma, cond, **kw)

    monkeypatch.setattr(tiny_model, "velocity", spy)
    b = _batch()
    FlowMatching(tiny_model, C.FlowConfig(), C.ObjectiveConfig(mode="teacher_forcing")).losses(
        b, 0, torch.Generator().manual_seed(0))
    assert seen["clean"] is b.video and seen["plan"].kind == "teacher_forcing"
    FlowMatching(tiny_model, C.FlowConfig(), C.ObjectiveConfig(mode="diffusion_forcing")).losses(
        b, 0, torch.Generator().manual_seed(0))
    assert seen["clean"] is None and seen["plan"].kind == "block_causal"


def test_unknown_mode_is_rejected(tiny_model):
    with pytest.raises(ValueError, match="unknown objective.mode"):
        FlowMatching(tiny_model, C.FlowConfig(), C.ObjectiveConfig(mode="forcing"))
