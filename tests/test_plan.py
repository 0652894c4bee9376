"""The memory planner (framecast/plan, docs/scaling.md): its exact numbers against real networks, objectives and
optimisers on the CPU, the FSDP2 chunk rule against torch.chunk, the activation estimate against what autograd
saves, and the Wan recipes of configs/wan2.1-1.3b/ (they load, and plan without a GPU or a checkpoint)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from framecast import config as C
from framecast import stages as S
from framecast.errors import ConfigError
from framecast.generate import build_denoiser
from framecast.models.attention import AttentionPlan
from framecast.models.codecs import shape_codec
from framecast.models.conditioning import Cond
from framecast.models.transformer import count_params
from framecast.plan import PROFILES, Profile, activation_estimate, networks, plan, plan_main, plan_stage, shard_numel
from framecast.plan import memory as M
from framecast.train.ema import EMA
from framecast.train.loop import step_generator

ROOT = Path(__file__).resolve().parents[1]
WAN_RECIPES = sorted((ROOT / "configs" / "wan2.1-1.3b").glob("*.yaml"))


def small_cfg(preset: str, stage: str, **extra) -> C.RunConfig:
    """A stage on a CPU-sized clip: 2 frames of 32x32, batch 1, with a generator EMA."""
    return C.from_dict({"stage": stage, "model": {"preset": preset}, "data": {"num_frames": 2},
                        "train": {"batch_size": 1, "ema_decay": 0.99}, **extra})


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def chunk_bytes(modules, world: int, rank: int) -> int:
    """Independent of the planner: what rank `rank` holds of these modules' fp32 parameters under FSDP2."""
    out = 0
    for m in modules:
        for p in m.parameters():
            parts = torch.chunk(p.detach(), world, dim=0)
            out += parts[rank].numel() * p.element_size() if rank < len(parts) else 0
    return out


def build_stage(cfg: C.RunConfig):
    """The stage's real objective on random networks (no checkpoint), as recipe.train_stage builds it."""
    st = S.get(cfg.stage)
    torch.manual_seed(0)
    model = build_denoiser(cfg.model)
    roles = {r.key.split(".")[1]: build_denoiser(cfg.model) for r in st.roles}
    source = S.build_data(cfg)
    return st.build(cfg, model, source, roles), roles, source


@pytest.mark.parametrize("shape", [(7, 3), (1, 6, 5), (16,), (5,), (3, 4), (130, 2)])
@pytest.mark.parametrize("world", [1, 2, 3, 4, 8, 9])
def test_the_chunk_rule_is_torch_chunk(shape, world):
    t = torch.empty(shape)
    parts = torch.chunk(t, world, dim=0)
    for rank in range(world):  # ranks past the number of chunks hold an empty shard
        assert shard_numel(shape, world, rank) == (parts[rank].numel() if rank < len(parts) else 0)
    assert sum(shard_numel(shape, world, r) for r in range(world)) == t.numel()


@pytest.mark.parametrize("preset", ["tiny", "toy"])
@pytest.mark.parametrize("stage", ["stage1", "cd", "dmd"])
def test_planned_bytes_are_what_the_stage_really_holds(preset, stage):
    cfg = small_cfg(preset, stage)
    built, roles, source = build_stage(cfg)
    obj = built.objective
    prof = PROFILES.get(stage, Profile())
    # the profile says what the objective trains, averages and copies: check it against the objective itself
    assert set(obj.roles) == {"model", *prof.trained}
    assert set(obj.ema_role_names()) == set(obj.roles if prof.ema is None else prof.ema)
    assert set(obj.state_modules()) == set(prof.copies)
    trained = list(obj.roles.values())
    frozen = [m for n, m in roles.items() if n not in obj.roles] + list(obj.state_modules().values())

    opts = {n: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad]) for n, m in obj.roles.items()}
    g = step_generator(cfg.train.seed, 0)
    losses = obj.losses(source.batch(cfg.train.batch_size, g), 0, g)  # step 0: DMD trains both roles
    assert set(losses) == set(obj.roles)
    for loss, _ in losses.values():
        loss.backward()
    grads = nbytes(p.grad for m in trained for p in m.parameters() if p.grad is not None)
    for o in opts.values():
        o.step()
    optim = nbytes(v for o in opts.values() for s in o.state.values() for v in s.values() if torch.is_tensor(v))
    ema = sum(nbytes(EMA(obj.roles[n], cfg.train.ema_decay).shadow.values()) for n in obj.ema_role_names())

    row = plan_stage(cfg, gpus=1)
    assert row.params == nbytes(p for m in trained for p in m.parameters())
    assert row.grads == grads
    assert row.optim == optim
    assert row.ema == ema
    assert row.frozen == nbytes(p for m in frozen for p in m.parameters())

    two = plan_stage(cfg, gpus=2)  # rank 0 of 2, against torch.chunk of the real parameters
    ema_nets = [obj.roles[n] for n in obj.ema_role_names()]
    assert two.params == two.grads == chunk_bytes(trained, 2, 0)
    assert two.frozen == chunk_bytes(frozen, 2, 0)
    assert two.ema == chunk_bytes(ema_nets, 2, 0)
    n_tensors = sum(1 for m in trained for _ in m.parameters())
    assert two.optim == 2 * chunk_bytes(trained, 2, 0) + n_tensors * 4  # exp_avg, exp_avg_sq; one fp32 step each
    nets = networks(cfg, {})
    assert M.static_bytes(nets, 2, False, rank=1)["params"] == chunk_bytes(trained, 2, 1) <= two.params


def test_the_wan_presets_have_the_released_sizes():
    n = count_params(build_denoiser(C.model_preset("wan2.1-1.3b"), "meta"))
    big = count_params(build_denoiser(C.model_preset("wan2.1-14b"), "meta"))
    print(f"\nWan2.1-T2V-1.3B preset: {n:,} parameters; 14B preset: {big:,}")
    assert 1.40e9 < n < 1.45e9  # Wan2.1-T2V-1.3B: about 1.42e9 with the text and time embedders
    assert 14.0e9 < big < 14.5e9
    assert M.layout(C.model_preset("wan2.1-1.3b")).count == n


@pytest.mark.parametrize("path", WAN_RECIPES, ids=lambda p: p.stem)
def test_the_wan_recipes_load_and_plan(path):
    rec = C.load_recipe(path)
    assert {c.data.name for c in rec.stages} == {"store"} and all(c.model.preset == "wan2.1-1.3b" for c in rec.stages)
    cfg = rec.stages[0]
    codec = shape_codec(cfg.model.codec, cfg.model.in_channels, cfg.model.codec_source)
    latent = codec.latent_shape((codec.pixel_channels, cfg.data.height, cfg.data.width))
    assert (codec.latent_frames(cfg.data.num_frames), latent) == (21, (16, 60, 104))  # method.md notation
    rows = plan(rec, gpus=8, gpu_memory_gib=80, roles={"dmd.real": "wan2.1-14b"})
    assert [r.stage for r in rows] == [c.tag or c.stage for c in rec.stages]
    for r in rows:
        assert r.tokens == 21 * (60 // 2) * (104 // 2) and r.fits is not None
        real = [n for n in r.nets if n[0] == "real"]
        assert real == [] or real[0][2] == "wan2.1-14b"


def test_plan_main_prints_a_table_and_refuses_bad_input():
    recipe = str(WAN_RECIPES[0].parent / "framewise_2step_cfpp.yaml")
    text = plan_main(recipe, [], [1, 8, 64], 80.0, ["dmd.real=wan2.1-14b"])
    for key in ("| stage1 | 1 |", "| cd | 8 |", "| dmd_2step | 64 |", "fits 80 GiB", "real wan2.1-14b frozen"):
        assert key in text
    bad = [([recipe, [], [8], 80.0, ["dmd.real"]], "expected <role key>="),
           ([recipe, [], [8], 80.0, ["cd.critic=wan2.1-14b"]], "no stage of this recipe has that role"),
           ([recipe, [], [8], 80.0, ["dmd.real=wan9"]], "not a model preset"),
           ([recipe, [], [8], 80.0, ["dmd.real=tiny"]], "in_channels/text_dim"),
           ([recipe, ["dist.shard_group=3"], [8], 80.0, []], "must divide the number of GPUs"),
           ([recipe, [], [0], 80.0, []], "--gpus must be >= 1"),
           ([recipe, [], [], 80.0, []], "at least one GPU count"),
           ([recipe, [], [8], -1.0, []], "--gpu-memory must be > 0")]
    for args, msg in bad:
        with pytest.raises(ConfigError, match=msg):
            plan_main(*args)


def test_hybrid_sharding_holds_what_the_group_holds():
    rec = C.load_recipe(WAN_RECIPES[0].parent / "framewise_2step_cfpp.yaml")
    hybrid = C.load_recipe(WAN_RECIPES[0].parent / "framewise_2step_cfpp.yaml", ["dist.shard_group=8"])
    for a, b in zip(plan(rec, gpus=8), plan(hybrid, gpus=64)):
        assert (a.total, a.shard, b.shard) == (b.total, 8, 8)


def _saved_bytes(fn, params) -> int:
    """Bytes autograd saves for backward while `fn` runs, parameters left out (counted once per storage view)."""
    own = {p.untyped_storage().data_ptr() for p in params}
    seen: dict[tuple, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in own:
            seen[(ptr, t.storage_offset(), t.numel(), t.dtype)] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


@pytest.mark.parametrize("preset,mode,ckpt", [("toy", "teacher_forcing", False), ("toy", "teacher_forcing", True),
                                              ("tiny", "bidirectional", False), ("toy", "bidirectional", True)])
def test_the_activation_estimate_is_near_what_autograd_saves(preset, mode, ckpt):
    """fp32 on the CPU, whose SDPA saves no attention matrix either: the estimate of the stored graph (and mask)
    is within a third of the measured bytes."""
    stage = "stage0" if mode == "bidirectional" else "stage1"
    cfg = small_cfg(preset, stage, data={"num_frames": 4}, model={"preset": preset, "gradient_checkpointing": ckpt})
    est = activation_estimate(cfg, networks(cfg, {}), 4)
    torch.manual_seed(0)
    d = build_denoiser(cfg.model).train()
    x = torch.randn(1, 4, 3, 32, 32)
    cond = Cond(torch.randn(1, cfg.data.text_tokens, cfg.model.text_dim))
    plan_ = AttentionPlan(mode, 1) if mode != "bidirectional" else AttentionPlan("bidirectional")
    clean = x.clone() if mode == "teacher_forcing" else None
    got = _saved_bytes(lambda: d.velocity(x, torch.rand(1, 4), cond, plan=plan_, clean=clean), d.parameters())
    assert 0.75 < (est.stored + est.mask) / got < 1.33, (est, got)


def test_cached_forwards_are_checkpointed_as_the_planner_assumes():
    """plan.memory.CHECKPOINTED_CACHED_FORWARDS mirrors the transformer: with a KV cache (DMD's self-rollout)
    does model.gradient_checkpointing change what a forward keeps for its backward?"""
    saved = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        d = build_denoiser(C.model_preset("tiny", gradient_checkpointing=ckpt)).train()
        cond = Cond(torch.randn(1, 4, d.net.config.text_dim))
        cache = d.new_cache()
        d.commit(torch.randn(1, 1, 3, 32, 32), cond, cache, positions=torch.arange(1))
        x = torch.randn(1, 1, 3, 32, 32)
        saved.append(_saved_bytes(lambda: d.x0(x, torch.rand(1, 1), cond, cache=cache, positions=torch.arange(1, 2)),
                                  d.parameters()))
    assert (saved[1] < saved[0]) == M.CHECKPOINTED_CACHED_FORWARDS, saved


def test_the_self_rollout_estimate_is_near_what_autograd_saves():
    """DMD's generator rollout (method.md §7.2): every exit forward's graph, whose attention saved the block's
    keys and values with the cached context. The KV cache itself is held, not saved, so it is left out here."""
    cfg = small_cfg("tiny", "dmd", data={"num_frames": 4})
    built, _, source = build_stage(cfg)
    obj, g = built.objective, step_generator(0, 0)
    batch = source.batch(1, g)
    got = _saved_bytes(lambda: obj.self_rollout(batch, g), list(obj.model.parameters()))
    frames, per_frame = M.geometry(cfg)
    cache = 2 * cfg.model.dim * 4 * cfg.model.num_layers * per_frame * frames  # K and V of every frame, fp32
    est = M._rollout_bytes(cfg.model, cfg, frames, per_frame, 1, 4) - cache
    assert 0.75 < est / got < 1.33, (est, got)
