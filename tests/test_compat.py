"""Runs and checkpoints written before the restructuring (a `distill:` config section, a string-keyed sampling
dict with `frame_shape`, no `model.codec`, objective.mode recorded for every stage) still load, sample,
resume and are reused by a recipe. The old layout is made here by rewriting a fresh checkpoint's meta.json
exactly as the older framecast wrote it."""

import json
from pathlib import Path

import torch

from framecast import config as C
from framecast.generate import load
from framecast.recipe import run_recipe, train_stage
from framecast.spec import SamplingSpec
from framecast.train import checkpoint as ckpt

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
OLD_DISTILL = {"denoising_steps": [1000, 500], "first_block_steps": [], "grid_steps": 8, "teacher": "", "guidance": 3.0,
               "ode_teacher": "causal", "num_pairs": 256, "shard_size": 64, "pairs_dir": "", "pair_mode": "cached",
               "target_decay": 0.99, "real": "", "critic": "", "real_guidance": 4.0, "critic_ratio": 5,
               "critic_lr": 4.0e-7, "critic_betas": [0.0, 0.999], "dmd_sigma_min": 0.02, "dmd_sigma_max": 0.98,
               "context_sigma": 0.0}


def make_old(path: Path) -> None:
    """Rewrite every checkpoint of a run in the layout of the older framecast."""
    for step in sorted(path.glob("step_*")):
        meta = json.loads((step / "meta.json").read_text())
        cfg, sm = meta["config"], meta["sampling"]
        if "distill" in cfg:
            continue  # already old
        for section in ("few_step", "ode", "cd", "dmd"):
            cfg.pop(section)
        cfg["model"].pop("codec")
        cfg["objective"]["mode"] = "teacher_forcing"  # the old default, recorded even for stage0
        cfg["distill"] = dict(OLD_DISTILL)
        old = {"causal": sm["causal"], "mode": sm["mode"], "block_size": sm["block_size"], "window": sm["window"],
               "sink": sm["sink"], "sampler": sm["sampler"], "steps": sm["steps"], "shift": sm["shift"],
               "guidance": sm["guidance"], "num_frames": sm["num_frames"], "frame_shape": sm["latent_shape"],
               "text_encoder": sm["text_encoder"], "text_tokens": sm["text_tokens"], "few_step": sm["few_step"]}
        meta["sampling"] = old
        (step / "meta.json").write_text(json.dumps(meta, indent=2))


def test_old_checkpoints_load_sample_resume_and_are_reused(tmp_path, one_thread):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: old\nbase: {TINY}\nstages:\n  stage0: {{train: {{steps: 4, ckpt_every: 2}}}}\n")
    straight = run_recipe(recipe, ["train.progress=false"], out_dir=str(tmp_path / "a"), health_clips=0)[0]
    reference = ckpt.load_state_dict(straight.ckpt, "model")
    spec = load(straight.ckpt).spec
    # an interrupted old run: checkpoints at step 2 only, written in the old layout
    cfg = C.load(TINY, [f"out_dir={tmp_path / 'b'}", "name=old", "stage=stage0", "train.steps=2",
                        "train.ckpt_every=2", "train.progress=false"])
    train_stage(cfg)
    make_old(cfg.run_dir / "ckpt")
    m = load(cfg.run_dir)  # loads: the old sampling dict is read as a SamplingSpec
    assert m.spec == spec.replace(num_frames=m.spec.num_frames) and m.config.dmd.sigma_min == 0.02
    assert m.sample(["a red circle moving right slow"], num_frames=2).shape == (1, 2, 3, 16, 16)
    # the recipe resumes it to step 4, bit-identical with the uninterrupted run
    resumed = run_recipe(recipe, ["train.progress=false"], out_dir=str(tmp_path / "b"), health_clips=0)[0]
    assert not resumed.reused and resumed.ckpt.name == "step_0000004"
    assert all(torch.equal(reference[k], v) for k, v in ckpt.load_state_dict(resumed.ckpt, "model").items())
    # a finished old run is reused, not retrained
    make_old(cfg.run_dir / "ckpt")
    again = run_recipe(recipe, ["train.progress=false"], out_dir=str(tmp_path / "b"), health_clips=0)[0]
    assert again.reused and again.ckpt == resumed.ckpt


def test_old_sampling_dicts_of_few_step_models_read_back():
    old = {"causal": True, "mode": "teacher_forcing", "block_size": 1, "window": 0, "sink": 0, "sampler": "few_step",
           "steps": 2, "shift": 5.0, "guidance": 1.0, "num_frames": 8, "frame_shape": [3, 32, 32],
           "text_encoder": "minilm", "text_tokens": 16, "few_step": True, "sigmas": [1.0, 0.8333333],
           "first_sigmas": [1.0, 0.9375, 0.8333333, 0.625], "denoising_steps": [1000, 500],
           "first_block_steps": [1000, 750, 500, 250]}
    s = SamplingSpec.from_json(old)
    assert s.few_step and s.causal and s.latent_shape == s.pixel_shape == (3, 32, 32) and s.codec == "identity"
    sched = s.schedule()
    assert sched.sampler == "few_step" and sched.sigmas.tolist() == torch.tensor([1.0, 0.8333333]).tolist()
    assert len(sched.first_sigmas) == 4 and s.nfe == 2
    assert SamplingSpec.from_json(s.to_json()) == s
