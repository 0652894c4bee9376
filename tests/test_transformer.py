"""The one network: equals diffusers' stock Wan forward with a bidirectional plan; clear shape errors."""

import pytest
import torch
from diffusers.models.transformers.transformer_wan import WanTransformer3DModel

from framecast import config as C
from framecast.models.transformer import build_transformer, count_params

from .conftest import randomise


def _stock(net, x, sigma, text):
    out = WanTransformer3DModel.forward(net, hidden_states=x.transpose(1, 2), timestep=sigma * 1000,
                                        encoder_hidden_states=text, return_dict=False)[0]
    return out.transpose(1, 2)


@pytest.mark.parametrize("shape", [(2, 5, 3, 16, 12), (1, 1, 3, 8, 8), (3, 9, 3, 4, 20)])
def test_bidirectional_equals_stock_wan(tiny_model, shape):
    net = tiny_model.net
    x = torch.randn(shape)
    text = torch.randn(shape[0], 7, net.config.text_dim)
    sigma = torch.rand(shape[0])
    with torch.no_grad():
        ours = net(x, sigma, text)
        stock = _stock(net, x, sigma, text)
    torch.testing.assert_close(ours, stock, atol=2e-5, rtol=1e-5)


def test_stock_state_dict_loads_unchanged(tiny_cfg):
    """Every module name is the stock one: a WanTransformer3DModel state dict loads strictly."""
    ours = build_transformer(tiny_cfg)
    stock = randomise(WanTransformer3DModel(**{k: v for k, v in ours.config.items() if not k.startswith("_")}))
    ours.load_state_dict(stock.state_dict(), strict=True)
    x, text, sigma = torch.randn(1, 3, 3, 8, 8), torch.randn(1, 4, tiny_cfg.text_dim), torch.rand(1)
    with torch.no_grad():
        torch.testing.assert_close(ours(x, sigma, text), _stock(stock, x, sigma, text), atol=2e-5, rtol=1e-5)


def test_per_frame_sigma_changes_only_that_frame_in_bidirectional_time_embedding(tiny_model):
    """Per-frame adaLN: frames of one forward can sit at different noise levels (method.md §3.2)."""
    net = tiny_model.net
    x, text = torch.randn(1, 4, 3, 8, 8), torch.randn(1, 5, net.config.text_dim)
    s1 = torch.full((1, 4), 0.5)
    s2 = s1.clone()
    s2[0, 2] = 0.9
    with torch.no_grad():
        a, b = net(x, s1, text), net(x, s2, text)
    assert (a - b)[:, 2].abs().max() > 1e-3


@pytest.mark.parametrize("preset, approx", [("wan2.1-1.3b", 1.419e9), ("wan2.1-14b", 14.29e9)])
def test_wan_presets_instantiate_on_meta(preset, approx):
    net = build_transformer(C.model_preset(preset), device="meta")
    n = count_params(net)
    assert abs(n - approx) / approx < 0.01, n
    assert next(net.parameters()).device.type == "meta"


def test_shape_errors_are_clear(tiny_model):
    net = tiny_model.net
    text = torch.randn(1, 4, net.config.text_dim)
    with pytest.raises(ValueError, match="channels"):
        net(torch.randn(1, 2, 4, 8, 8), torch.rand(1), text)
    with pytest.raises(ValueError, match="not divisible by the patch size"):
        net(torch.randn(1, 2, 3, 10, 8), torch.rand(1), text)
    with pytest.raises(ValueError, match=r"sigma must be \[B=1, F=2\]"):
        net(torch.randn(1, 2, 3, 8, 8), torch.rand(1, 3), text)
    with pytest.raises(ValueError, match="text must be"):
        net(torch.randn(1, 2, 3, 8, 8), torch.rand(1), torch.randn(1, 4, 5))
    with pytest.raises(ValueError, match=r"\[B, F, C, H, W\]"):
        net(torch.randn(2, 3, 8, 8), torch.rand(1), text)
    with pytest.raises(ValueError, match="needs the clean copy"):
        from framecast.models.attention import AttentionPlan
        net(torch.randn(1, 2, 3, 8, 8), torch.rand(1), text, plan=AttentionPlan("teacher_forcing"))


def test_fused_qkv_projections_give_the_same_output(tiny_model):
    net = tiny_model.net
    x, text, sigma = torch.randn(1, 3, 3, 8, 8), torch.randn(1, 4, net.config.text_dim), torch.rand(1)
    with torch.no_grad():
        a = net(x, sigma, text)
        net.fuse_qkv_projections()
        b = net(x, sigma, text)
        net.unfuse_qkv_projections()
    torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)
