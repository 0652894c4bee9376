"""The backbone seam (backbone.py): the Wan transformer is a `Backbone`, the causal helpers are reusable by a
second network (a toy one here passes the streaming == packed teacher-forcing test, architecture.md §4), and
gradient checkpointing gives the plain gradients."""

import pytest
import torch
from torch import nn

from framecast.models.attention import AttentionPlan
from framecast.models.backbone import (
    BIDIRECTIONAL,
    Backbone,
    LazyText,
    apply_rope,
    attend,
    cached_self_attention_kv,
    check_inputs,
    cross_attention_kv,
    frame_positions,
    layer_count,
    pack_teacher_forcing,
    patchify,
    plan_mask,
    rope_3axis,
    unpatchify,
)
from framecast.models.denoiser import Denoiser
from framecast.models.kv_cache import KVCache

from .test_equivalence import stream_tf


class ToyBackbone(nn.Module):
    """A second backbone from the same helpers: patch linear, sigma embedding, one attention layer per block."""

    def __init__(self, channels: int = 3, dim: int = 24, heads: int = 2, layers: int = 2, text_dim: int = 8) -> None:
        super().__init__()
        self.channels, self.heads, self.text_dim, self.patch = channels, heads, text_dim, (1, 2, 2)
        self.embed, self.sig = nn.Linear(channels * 4, dim), nn.Linear(1, dim)
        self.text_proj = nn.Linear(text_dim, dim)
        self.blocks = nn.ModuleList(nn.ModuleDict(dict(qkv=nn.Linear(dim, 3 * dim), kv=nn.Linear(dim, 2 * dim),
                                                       q=nn.Linear(dim, dim))) for _ in range(layers))
        self.out = nn.Linear(dim, channels * 4)

    @property
    def inner_dim(self) -> int:
        return self.out.in_features

    def forward(self, x, sigma, text, *, plan=BIDIRECTIONAL, positions=None, cache=None, commit=False, clean=None,
                clean_sigma=None, frame_emb=None):
        grid, sigma, positions = check_inputs(x, sigma, text, positions=positions, frame_emb=frame_emb, cache=cache,
                                              commit=commit, channels=self.channels, text_dim=self.text_dim,
                                              dim=self.inner_dim, patch_size=self.patch)
        x, sigma, positions, frame_emb = pack_teacher_forcing(x, sigma, positions, frame_emb, clean, clean_sigma,
                                                              plan, cache)
        h = self.embed(patchify(x, grid)) + self.sig(sigma[..., None])[:, :, None, None]  # [B, Fs, hp, wp, D]
        h = h.flatten(1, 3)  # [B, Fs*T, D]
        rope = rope_3axis(positions, grid.hp, grid.wp, self.inner_dim // self.heads)
        mask = None if cache is not None else plan_mask(plan, grid.F, grid.T, h.device, "sdpa")
        text_states = LazyText(self.text_proj, text)
        for i, blk in enumerate(self.blocks):
            q, k, v = (t.unflatten(2, (self.heads, -1)) for t in blk["qkv"](h).chunk(3, dim=-1))
            k, v = cached_self_attention_kv(i, apply_rope(k, rope), v, cache, commit)
            h = h + attend(apply_rope(q, rope), k, v, mask, "sdpa").flatten(2)
            kv = cross_attention_kv(i, cache, text_states, lambda s, blk=blk: tuple(
                t.unflatten(2, (self.heads, -1)) for t in blk["kv"](s).chunk(2, dim=-1)))
            h = h + attend(blk["q"](h).unflatten(2, (self.heads, -1)), *kv, None, "sdpa").flatten(2)
        if commit:
            cache.commit(positions)
        h = h.unflatten(1, (-1, grid.T))[:, -grid.F:]  # the noisy half under teacher forcing
        return unpatchify(self.out(h), grid, self.channels)


def test_wan_transformer_is_a_backbone(tiny_model):
    net = tiny_model.net
    assert isinstance(net, Backbone) and isinstance(ToyBackbone(), Backbone)
    assert tiny_model.num_layers == layer_count(net) == len(net.blocks)


def test_layer_count_falls_back_to_num_layers():
    class NoBlocks:
        num_layers = 5

    assert layer_count(NoBlocks()) == 5
    assert Denoiser(ToyBackbone(layers=3)).new_cache().num_layers == 3


@pytest.mark.parametrize("K, F, window, sink", [(1, 4, 0, 0), (2, 7, 4, 1), (3, 9, 6, 0)])
def test_a_second_backbone_streams_like_its_packed_forward(K, F, window, sink):
    net = ToyBackbone().eval()
    plan = AttentionPlan("teacher_forcing", K, window, sink)
    x, clean = torch.randn(2, F, 3, 4, 6), torch.randn(2, F, 3, 4, 6)
    sigma, text = torch.rand(2, F), torch.randn(2, 3, 8)
    with torch.no_grad():
        packed = net(x, sigma, text, plan=plan, clean=clean)
        streamed, _ = stream_tf(net, x, sigma, clean, text, plan)
    torch.testing.assert_close(streamed, packed, atol=2e-5, rtol=0)


def test_pack_teacher_forcing():
    B, F = 2, 3
    x, clean, sigma = torch.randn(B, F, 3, 4, 4), torch.randn(B, F, 3, 4, 4), torch.rand(B, F)
    pos, femb = torch.arange(4, 4 + F), torch.randn(B, F, 5)
    tf = AttentionPlan("teacher_forcing", 1)
    px, ps, pp, pf = pack_teacher_forcing(x, sigma, pos, femb, clean, None, tf, None)
    assert torch.equal(px, torch.cat([clean, x], 1)) and torch.equal(pp, torch.cat([pos, pos]))
    assert torch.equal(ps, torch.cat([torch.zeros_like(sigma), sigma], 1))
    assert torch.equal(pf, torch.cat([femb, femb], 1))
    assert pack_teacher_forcing(x, sigma, pos, None, None, None, BIDIRECTIONAL, None)[0] is x
    with pytest.raises(ValueError, match="needs the clean copy"):
        pack_teacher_forcing(x, sigma, pos, None, None, None, tf, None)
    with pytest.raises(ValueError, match="teacher_forcing plan and no cache"):
        pack_teacher_forcing(x, sigma, pos, None, clean, None, BIDIRECTIONAL, None)
    with pytest.raises(ValueError, match="must match x"):
        pack_teacher_forcing(x, sigma, pos, None, clean[:, :2], None, tf, None)


def test_frame_positions_continue_the_cache():
    cache = KVCache(1)
    cache.stage(0, torch.zeros(1, 8, 1, 2), torch.zeros(1, 8, 1, 2))
    cache.commit(torch.arange(2))
    assert frame_positions(None, cache, 3, torch.device("cpu")).tolist() == [2, 3, 4]
    assert frame_positions(None, None, 2, torch.device("cpu")).tolist() == [0, 1]
    with pytest.raises(ValueError, match=r"positions must have shape \[3\]"):
        frame_positions(torch.arange(2), None, 3, torch.device("cpu"))


def test_gradient_checkpointing_gives_the_plain_gradients(tiny_model):
    """Checkpointed blocks recompute in backward; the lazy text embedding must not change what they save."""
    net = tiny_model.net.train()
    x, clean = torch.randn(1, 4, 3, 8, 8), torch.randn(1, 4, 3, 8, 8)
    sigma, text = torch.rand(1, 4), torch.randn(1, 3, net.config.text_dim)
    grads = []
    for checkpointing in (False, True):
        net.gradient_checkpointing = checkpointing
        net.zero_grad()
        net(x, sigma, text, plan=AttentionPlan("teacher_forcing", 2), clean=clean).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in net.parameters() if p.grad is not None]))
    net.gradient_checkpointing = False
    torch.testing.assert_close(grads[1], grads[0], atol=1e-6, rtol=1e-5)
