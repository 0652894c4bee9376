"""Recorded episodes as training data for action-conditioned models: clips keep actions aligned, conditioning
dropout nulls the actions too, and every stage (base, AR, CD, ODE, DMD) trains on them with the action
embedder in the loop; guided AR sampling with actions slices the null branch per block."""

from pathlib import Path

import pytest
import torch

pytest.importorskip("minigrid", reason="needs the [world] extra: pip install -e '.[world]'")

from framecast import config as C  # noqa: E402
from framecast.data.envs import load_episodes, record  # noqa: E402
from framecast.generate import load  # noqa: E402
from framecast.models.conditioning import Cond  # noqa: E402
from framecast.models.denoiser import Guidance  # noqa: E402
from framecast.objectives.diffusion import drop_text  # noqa: E402
from framecast.recipe import run_recipe  # noqa: E402
from framecast.rollout import generate  # noqa: E402
from framecast.sampling import euler  # noqa: E402
from framecast.stages import build_data  # noqa: E402

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


@pytest.fixture(scope="module")
def episodes(tmp_path_factory):
    root = tmp_path_factory.mktemp("mg")
    record("minigrid", root, episodes=6, frames=8, seed=0, tile=2, size=16, shard_size=3, progress=False)
    return root


def cfg(episodes, *extra):
    return C.load(TINY, ["data.name=episodes", f"data.path={episodes}", "model.num_actions=4", *extra])


def test_clips_keep_actions_aligned_and_dropout_nulls_them(episodes, one_thread):
    src = build_data(cfg(episodes))
    ep = load_episodes(episodes)
    b = src.batch(5, torch.Generator().manual_seed(0))
    assert b.video.shape == (5, 4, 3, 16, 16) and b.cond.actions.shape == (5, 4)
    for i in range(5):  # find each clip in the recording: its actions are the recorded ones for those frames
        frames = ((b.video[i] + 1) * 127.5).round().to(torch.uint8)
        hits = [(e, t) for e in range(6) for t in range(5) if torch.equal(ep["frames"][e, t:t + 4], frames)]
        assert any(torch.equal(ep["actions"][e, t:t + 4], b.cond.actions[i]) for e, t in hits)
    assert (b.null.actions == 4).all()
    dropped = drop_text(b.cond, b.null, 1.0, torch.Generator())
    assert (dropped.actions == 4).all() and torch.equal(dropped.text, b.null.text)
    with pytest.raises(ValueError, match="model.num_actions=4"):
        build_data(cfg(episodes, "model.num_actions=5"))
    with pytest.raises(ValueError, match="data.path"):
        build_data(C.load(TINY, ["data.name=episodes", "model.num_actions=4"]))


def test_every_stage_trains_on_episodes(episodes, tmp_path, one_thread):
    recipe = tmp_path / "wm.yaml"
    recipe.write_text(
        f"name: wm\nbase: {TINY}\n"
        f"stages:\n  stage0: {{}}\n  stage1: {{}}\n  cd: {{}}\n  ode: {{init: '@stage1', ode: {{num_pairs: 2, shard_size: 2}}}}\n"
        f"  dmd: {{init: '@cd', few_step: {{denoising_steps: [1000, 500]}}}}\n")
    over = ["data.name=episodes", f"data.path={episodes}", "model.num_actions=4", "train.steps=2",
            "train.lr=1.0e-2", "train.warmup=0", "sample.steps=2"]
    results = run_recipe(recipe, over, out_dir=str(tmp_path / "runs"), health_clips=0)
    assert [r.key for r in results] == ["stage0", "stage1", "cd", "ode", "dmd"]
    for r in results:
        model = load(r.ckpt).denoiser
        assert model.action_embed.table.weight.abs().sum() > 0, r.key  # the zero-initialised embedder learnt
    from safetensors import (
        safe_open,  # the ODE pairs were generated, and are replayed, under their actions
    )
    with safe_open(str(tmp_path / "runs" / "wm" / "ode" / "pairs" / "shard_00000.safetensors"), "pt") as f:
        assert {"actions", "null_actions"} <= set(f.keys()) and f.get_tensor("actions").dtype == torch.int64
    import json

    from framecast.data.trajectories import PairSource, PairStore
    store_dir = tmp_path / "runs" / "wm" / "ode" / "pairs"
    pb = PairSource(PairStore(store_dir, json.loads((store_dir / "manifest.json").read_text()))).batch(
        2, torch.Generator().manual_seed(0))
    assert pb.cond.actions.shape == (2, 4) and (pb.null.actions == 4).all()
    # guided streaming with actions: the null branch is sliced per block like the conditional one
    model = load(results[1].ckpt).denoiser
    src = build_data(cfg(episodes))
    b = src.batch(2, torch.Generator().manual_seed(1))
    noise = torch.randn(b.video.shape, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = [generate(model, noise, Cond(b.cond.text, acts), sampler=euler, sigmas=torch.tensor([1.0, 0.5, 0.0]),
                        block_size=1, guidance=Guidance(2.0, b.null)) for acts in (b.cond.actions, b.null.actions)]
    assert out[0].shape == b.video.shape and not torch.allclose(out[0], out[1])


def test_psnr_and_controllability(episodes, tmp_path, one_thread):
    from framecast.eval import world as W
    from framecast.generate import (
        LoadedModel,
        build_denoiser,
        codec_for,
        text_encoder_for,
    )
    from framecast.stages import sampling_spec

    from .conftest import randomise

    a = torch.zeros(2, 3, 4, 4)
    assert torch.allclose(W.psnr(a + 0.1, a), torch.full((2,), 10 * torch.log10(torch.tensor(4 / 0.01))))
    with pytest.raises(ValueError, match="psnr"):
        W.psnr(a, a[:1])
    c = cfg(episodes, "stage=stage1", "sample.steps=2")
    spec = sampling_spec(c)
    model = LoadedModel(randomise(build_denoiser(c.model)).eval(), spec, codec_for(c), text_encoder_for(spec, c), c)
    ep = load_episodes(episodes)
    frames, actions = ep["frames"][:, :4], ep["actions"][:, :4]
    m = W.controllability(model, frames, actions, context=1)
    assert len(m["psnr_by_horizon"]) == 3 and m["delta_psnr"] == pytest.approx(m["psnr"] - m["psnr_shuffled"])
    assert m["delta_psnr"] != 0  # a random model with a random action embedder still reacts to actions
    with pytest.raises(ValueError, match="context"):
        W.open_loop(model, frames, actions, context=4)
