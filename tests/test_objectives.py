import pytest
import torch

from framecast import config as C
from framecast.data.batch import Batch
from framecast.models.conditioning import Cond
from framecast.objectives.diffusion import FlowMatching, motion_weights


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


def test_motion_weights_mark_what_moved_since_the_previous_frame():
    x = torch.zeros(1, 3, 2, 4, 4)  # a sprite of one element moves from (0, 0) to (1, 2), then stays
    x[0, 0, 1, 0, 0] = 1.0
    x[0, 1:, 0, 1, 2] = 0.5
    w = motion_weights(x, 3.0, 0.1)  # [1, 3, 1, 4, 4]
    assert w.shape == (1, 3, 1, 4, 4)
    assert torch.equal(w[0, 0], torch.ones(1, 4, 4))  # the first frame has no previous one
    moved = {(int(i), int(j)) for i, j in (w[0, 1, 0] > 1).nonzero()}
    assert moved == {(0, 0), (1, 2)} and w[0, 1, 0, 0, 0] == 4.0  # where it was and where it is
    assert torch.equal(w[0, 2], torch.ones(1, 4, 4))  # it stayed
    high = motion_weights(x, 3.0, 0.6)[0, 1, 0] > 1  # the 0.5 change is under a 0.6 threshold, the 1.0 one is not
    assert {(int(i), int(j)) for i, j in high.nonzero()} == {(0, 0)}


def test_motion_weight_leaves_a_still_video_alone_and_weighs_a_moving_one(tiny_model):
    still = _batch()
    still.video[:] = still.video[:, :1]  # every frame the same: nothing moved
    moving = _batch()

    def loss(batch, weight):
        obj = FlowMatching(tiny_model, C.FlowConfig(), C.ObjectiveConfig(mode="teacher_forcing", motion_weight=weight))
        return obj.losses(batch, 0, torch.Generator().manual_seed(0))["model"]

    with torch.no_grad():
        assert torch.equal(loss(still, 0.0)[0], loss(still, 5.0)[0])
        (base, logs0), (weighted, logs5) = loss(moving, 0.0), loss(moving, 5.0)
    assert weighted > base and logs5["mse"] == logs0["mse"]  # the logged mse stays unweighted
