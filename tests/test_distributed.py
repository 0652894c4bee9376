"""torchrun + FSDP2 on the CPU with gloo, 2 processes, tiny preset, for Stage 1, causal CD and DMD (docs/scaling.md).

(a) 2 ranks x batch B give the losses of 1 process with grad_accum 2 at batch B (the same global batch);
(b) SIGKILL of one rank mid-run, then the same command again, gives the losses of the uninterrupted run;
(c) the 2-rank DCP checkpoint, exported by `framecast convert`, loads in one process and samples the frames the
    2 ranks sampled with their sharded networks; a DCP checkpoint also resumes in one process (resharded);
and grad_accum 2 x batch B equals batch 2B in one process. tests/dist_driver.py trains the three stages.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as tdist

sys.path.insert(0, str(Path(__file__).parent))
import dist_driver as D  # noqa: E402

pytestmark = pytest.mark.skipif(not tdist.is_available() or not tdist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")
ROOT = Path(__file__).resolve().parents[1]
LOCAL = {"GLOO_SOCKET_IFNAME": "lo"}  # gloo over loopback: no dependence on the host name resolving
RTOL = 1e-5  # float summation order differs (per-rank gradients reduce-scattered vs accumulated in one process)
TRACK = ("model/loss", "critic/loss", "model/grad_norm", "critic/grad_norm", "model/mse")


def torchrun(out: Path, inputs: Path, *extra: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "tests" / "dist_driver.py"), str(out), str(inputs), "--accum", "1", *extra]
    e = {**LOCAL, **os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", **(env or {})}
    for k in ("FRAMECAST_FAULT", "FRAMECAST_FAULT_RANK"):
        if env is None or k not in env:
            e.pop(k, None)
    return subprocess.run(cmd, env=e, capture_output=True, text=True, timeout=600)


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def assert_rows_close(a: list[dict], b: list[dict], rtol: float) -> float:
    """Same steps and the same values of every tracked key; returns the largest relative difference."""
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, D.STEPS + 1))
    worst = 0.0
    for x, y in zip(a, b):
        keys = [k for k in TRACK if k in x or k in y]
        assert keys and all(k in x and k in y for k in keys), (x, y)
        for k in keys:
            worst = max(worst, abs(x[k] - y[k]) / max(abs(y[k]), 1e-12))
    assert worst <= rtol, f"largest relative difference {worst:.2e} > {rtol:.0e}"
    return worst


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Inputs, the 1-process reference (grad_accum 2) and the uninterrupted 2-rank run of all three stages."""
    root = tmp_path_factory.mktemp("dist")
    inputs = root / "inputs"
    D.make_inputs(inputs)
    from framecast.recipe import train_stage

    for stage in D.ALL:
        train_stage(D.config(stage, root / "one", inputs, accum=2))
    done = torchrun(root / "two", inputs)
    assert done.returncode == 0, done.stderr[-3000:]
    return root, inputs


@pytest.mark.parametrize("stage", D.ALL)
def test_two_ranks_equal_one_process_with_the_same_global_batch(runs, stage):
    root, _ = runs
    worst = assert_rows_close(rows(root / "two" / stage), rows(root / "one" / stage), RTOL)
    print(f"{stage}: 2 ranks vs 1 process, largest relative difference over {D.STEPS} steps {worst:.1e}")
    meta = json.loads((root / "two" / stage / "ckpt" / f"step_{D.STEPS:07d}" / "meta.json").read_text())
    assert meta["format"] == "dcp" and meta["world_size"] == 2
    assert any(f.endswith(".distcp") for f in meta["files"])
    if stage == "ode":  # each rank made its own shards of the pair store (shard i % 2 == rank)
        timing = [json.loads((root / "two" / "ode" / "pairs" / f"timing.rank{r}.json").read_text()) for r in (0, 1)]
        assert sorted(timing[0]) == ["0"] and sorted(timing[1]) == ["1"], timing


def test_each_rank_holds_half_of_every_network(runs):
    """fully_shard per block and root: the two ranks' local shards add up to the whole networks, split on dim 0."""
    root, inputs = runs
    from framecast.generate import build_denoiser
    from framecast.plan.memory import rank_numel

    for stage in D.ALL:
        r0, r1 = (json.loads((root / "two" / stage / f"rank{r}.json").read_text()) for r in (0, 1))
        assert r0["world"] == r1["world"] == 2
        model = build_denoiser(D.config(stage, root / "x", inputs, 1).model)
        want = [sum(torch.chunk(p, 2, dim=0)[r].numel() * p.element_size() if len(torch.chunk(p, 2, dim=0)) > r
                    else 0 for p in model.parameters()) for r in (0, 1)]
        planned = [4 * rank_numel([p.shape for p in model.parameters()], 2, r) for r in (0, 1)]  # fp32
        assert planned == want  # the planner's chunk rule (framecast/plan) is what FSDP2 did
        nets = {"stage0": ["model"], "stage1": ["model"], "ode": ["model"],
                "cd": ["model", "obj_target", "frozen_teacher"],
                "dmd": ["model", "critic", "frozen_real"]}[stage]
        assert sorted(r0["bytes"]) == sorted(r1["bytes"]) == sorted(nets)
        for net in nets:  # every network of a tiny stage has the tiny architecture
            assert [r0["bytes"][net], r1["bytes"][net]] == want, net


def test_sigkill_of_one_rank_then_the_same_command_gives_the_same_losses(runs, tmp_path):
    """Rank 1 is killed once in each stage (FRAMECAST_FAULT=step:n counts the steps of one launch); torchrun
    stops the job; each restart resumes from the newest complete DCP checkpoint."""
    root, inputs = runs
    out = tmp_path / "killed"
    # launch 1 dies at stage1 step 7; launch 2 redoes 5..10 (6 steps), dies at cd step 7 (6 + 7 = 13); launch 3
    # redoes cd 5..10 and dies at dmd step 7; launch 4 finishes
    three = ("--stages", ",".join(D.STAGES))
    for n in (7, 13, 13):
        r = torchrun(out, inputs, *three, env={"FRAMECAST_FAULT": f"step:{n}", "FRAMECAST_FAULT_RANK": "1"})
        assert r.returncode != 0, "the killed job must fail"
    r = torchrun(out, inputs, *three)
    assert r.returncode == 0, r.stderr[-3000:]
    for stage in D.STAGES:
        worst = assert_rows_close(rows(out / stage), rows(root / "two" / stage), 1e-6)
        print(f"{stage}: killed and resumed vs uninterrupted, largest relative difference {worst:.1e}")
        steps = sorted(p.name for p in (out / stage / "ckpt").iterdir() if p.is_dir())
        assert steps == [f"step_{s:07d}" for s in (4, 8, 10)], steps  # resumed: nothing was moved aside


@pytest.mark.parametrize("stage", D.STAGES)
def test_exported_dcp_checkpoint_samples_the_frames_of_the_two_ranks(runs, tmp_path, stage):
    root, _ = runs
    from safetensors.torch import load_file

    from framecast.generate import load, sample

    run = root / "two" / stage
    out = tmp_path / "exported"
    r = subprocess.run([sys.executable, "-m", "framecast.cli", "convert", str(run), "--out", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    m = load(out)
    assert not (out / "ckpt" / "step_0000000" / "dcp").exists()  # one safetensors checkpoint
    cond, null = D_prompts(m)
    latents = sample(m.denoiser, m.spec, cond, null, num_frames=m.config.sample.num_frames, seed=m.config.sample.seed)
    two = load_file(str(run / "samples" / f"step_{D.STEPS:07d}.safetensors"))["latents"]  # sharded, 2 ranks
    torch.testing.assert_close(latents, two, rtol=1e-5, atol=1e-6)
    direct = load(run)  # the DCP checkpoint itself, in one process
    for k, v in direct.denoiser.state_dict().items():
        torch.testing.assert_close(m.denoiser.state_dict()[k], v, rtol=0, atol=0)


def D_prompts(m):
    from framecast.models.conditioning import Cond

    prompts = m.config.sample.prompts
    return Cond(m.text_encoder.encode(prompts)), Cond(m.text_encoder.encode([""] * len(prompts)))


def test_a_two_rank_checkpoint_resumes_in_one_process(runs, tmp_path):
    """DCP reshards: step 8 of the 2-rank Stage 1 continues in one process (grad_accum 2) to the same losses."""
    root, inputs = runs
    name = tmp_path / "resharded"
    (name / "stage1" / "ckpt").mkdir(parents=True)
    src = root / "two" / "stage1"
    shutil.copytree(src / "ckpt" / "step_0000008", name / "stage1" / "ckpt" / "step_0000008")
    kept = [line for line in (src / "metrics.jsonl").read_text().splitlines() if json.loads(line)["step"] <= 8]
    (name / "stage1" / "metrics.jsonl").write_text("\n".join(kept) + "\n")
    from framecast.recipe import train_stage

    train_stage(D.config("stage1", name, inputs, accum=2))
    assert_rows_close(rows(name / "stage1"), rows(root / "two" / "stage1"), RTOL)
    saved = sorted(p.name for p in (name / "stage1" / "ckpt").iterdir() if p.is_dir())
    assert saved == ["step_0000008", f"step_{D.STEPS:07d}"], saved  # resumed at 8: step 4 was never redone


@pytest.mark.parametrize("stage", D.STAGES)
def test_grad_accum_of_two_batches_equals_one_batch_of_twice_the_size(runs, tmp_path, stage):
    root, inputs = runs
    from framecast.recipe import train_stage

    train_stage(D.config(stage, tmp_path / "big", inputs, accum=1, batch=2 * D.BATCH))
    worst = assert_rows_close(rows(tmp_path / "big" / stage), rows(root / "one" / stage), RTOL)
    print(f"{stage}: grad_accum 2 x batch {D.BATCH} vs batch {2 * D.BATCH}: largest relative difference {worst:.1e}")


def test_pretrained_weights_load_shard_by_shard(tmp_path):
    """meta-device construction, fully_shard, then each rank reads only its rows: a diffusers folder, a sharded
    original folder (Wan renames applied lazily) and a framecast checkpoint, gathered back, equal the whole load."""
    from wan_tiny import tiny_transformer_config, write_diffusers_transformer, write_original_folder

    from framecast.train.checkpoint import save

    cfg = {**tiny_transformer_config(), "num_layers": 3}
    sd = write_diffusers_transformer(tmp_path / "diffusers", seed=3, config=cfg)
    write_original_folder(tmp_path / "original", sd, shards=2, config=cfg)
    from framecast import stages as S
    from framecast.config import to_dict
    from framecast.generate import build_denoiser

    fc = S.normalise(D.config("stage1", tmp_path / "x", tmp_path, 1))
    torch.manual_seed(0)
    model = build_denoiser(fc.model)
    meta = {"stage": "stage1", "sampling": S.sampling_spec(fc).to_json(), "config": to_dict(fc), "roles": ["model"],
            "ema": []}
    save(tmp_path / "framecast", 1, weights={"model": model.state_dict()}, meta=meta)
    folders = [tmp_path / "diffusers", tmp_path / "original", tmp_path / "framecast" / "step_0000001"]
    r = torchrun(tmp_path / "out", tmp_path, "--check-load", *map(str, folders))
    assert r.returncode == 0, r.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / "out" / f"load_rank{i}.json").read_text()) for i in (0, 1))
    for name in r0:
        assert r0[name]["same"] and r1[name]["same"], name
        assert r0[name]["local_params"] + r1[name]["local_params"] == r0[name]["params"]
        assert r0[name]["local_params"] < 0.6 * r0[name]["params"], "each rank holds about half, never the whole"


def test_bf16_mixed_precision_keeps_fp32_master_weights(runs, tmp_path):
    """dist.mixed_precision=bf16 (bf16 compute, fp32 reduce) runs on gloo: the losses stay near fp32's and the
    checkpoint holds the fp32 master weights. (The papers train this way on GPUs; CPU bf16 matmuls are slow.)"""
    root, inputs = runs
    r = torchrun(tmp_path / "bf16", inputs, "--stages", "stage1,cd", "--set", "dist.mixed_precision=bf16")
    assert r.returncode == 0, r.stderr[-3000:]
    cd = json.loads((tmp_path / "bf16" / "cd" / "rank0.json").read_text())["bytes"]
    assert 2 * cd["frozen_teacher"] == cd["model"] == cd["obj_target"]  # frozen shards in bf16, the rest fp32
    assert all(math.isfinite(r["model/loss"]) for r in rows(tmp_path / "bf16" / "cd"))
    bf, fp = rows(tmp_path / "bf16" / "stage1"), rows(root / "one" / "stage1")
    worst = max(abs(x["model/loss"] - y["model/loss"]) / abs(y["model/loss"]) for x, y in zip(bf, fp))
    assert 0 < worst < 1e-2, worst  # bf16 rounding shows, and stays small
    print(f"stage1 bf16 vs fp32: largest relative loss difference {worst:.1e}")
    from framecast.train import checkpoint as ckpt

    sd = ckpt.load_state_dict(tmp_path / "bf16" / "stage1" / "ckpt" / f"step_{D.STEPS:07d}", "model")
    assert {v.dtype for v in sd.values()} == {torch.float32}


def test_torchrun_runs_a_recipe_through_the_cli_and_a_rerun_reuses_it(tmp_path):
    """The user's command: `torchrun ... -m framecast.cli pipeline --recipe R`; rank 0 checks each stage's health."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"""name: r
base: {ROOT / 'configs' / 'tiny.yaml'}
stages:
  stage0: {{train: {{steps: 2}}}}
  stage1: {{train: {{steps: 2}}}}
  cd: {{train: {{steps: 2}}, cd: {{grid_steps: 8}}, few_step: {{denoising_steps: [1000, 500]}}}}
  dmd: {{train: {{steps: 2}}, dmd: {{critic_ratio: 1}}, few_step: {{denoising_steps: [1000, 500]}}}}
""")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "framecast.cli", "pipeline", "--recipe", str(recipe), "--out", str(tmp_path / "runs"), "train.threads=1",
           "sample.steps=2"]
    env = {**LOCAL, **os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    for stage in ("stage0", "stage1", "cd", "dmd"):
        run = tmp_path / "runs" / "r" / stage
        meta = json.loads((run / "ckpt" / "step_0000002" / "meta.json").read_text())
        assert meta["format"] == "dcp" and meta["world_size"] == 2
        assert (run / "health.json").is_file()
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and again.stdout.count("finished earlier, reusing") == 2 * 4, again.stdout[-2000:]


def test_a_dcp_index_that_holds_code_is_refused_without_running_it(runs, tmp_path):
    """DCP pickles its index; framecast unpickles only DCP's own records (train/dcp_read.py)."""
    import pickle

    from framecast.errors import CheckpointError
    from framecast.generate import load

    root, _ = runs
    bad = tmp_path / "step"
    shutil.copytree(root / "two" / "stage1" / "ckpt" / f"step_{D.STEPS:07d}", bad)
    flag = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {flag}",))

    (bad / "dcp" / ".metadata").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(CheckpointError, match=r"\.metadata is corrupt or not a DCP index .*posix.system"):
        load(bad)
    assert not flag.exists()


def test_hybrid_sharding_gives_the_same_losses(runs, tmp_path):
    """dist.shard_group=1 on 2 ranks: a (replicate 2, shard 1) mesh, every rank holding whole networks, gradients
    averaged across the replicas; the losses are those of one process with the same global batch."""
    root, inputs = runs
    r = torchrun(tmp_path / "hsdp", inputs, "--stages", "stage1", "--set", "dist.shard_group=1")
    assert r.returncode == 0, r.stderr[-3000:]
    assert_rows_close(rows(tmp_path / "hsdp" / "stage1"), rows(root / "one" / "stage1"), RTOL)
    r0, r1 = (json.loads((tmp_path / "hsdp" / "stage1" / f"rank{i}.json").read_text()) for i in (0, 1))
    assert r0["bytes"] == r1["bytes"]  # replicated: each rank holds everything


def test_a_one_process_checkpoint_resumes_on_two_ranks(runs, tmp_path):
    """Scale out: step 8 of the one-process Stage 1 (safetensors, grad_accum 2) continues on 2 ranks (grad_accum 1,
    the same global batch), each rank taking its rows of the weights, EMA and AdamW state, to the same losses."""
    root, inputs = runs
    run = tmp_path / "out" / "stage1"
    (run / "ckpt").mkdir(parents=True)
    src = root / "one" / "stage1"
    shutil.copytree(src / "ckpt" / "step_0000008", run / "ckpt" / "step_0000008")
    kept = [line for line in (src / "metrics.jsonl").read_text().splitlines() if json.loads(line)["step"] <= 8]
    (run / "metrics.jsonl").write_text("\n".join(kept) + "\n")
    r = torchrun(tmp_path / "out", inputs, "--stages", "stage1")
    assert r.returncode == 0, r.stderr[-3000:]
    assert_rows_close(rows(run), rows(src), RTOL)
    saved = sorted(p.name for p in (run / "ckpt").iterdir() if p.is_dir())
    assert saved == ["step_0000008", f"step_{D.STEPS:07d}"], saved  # resumed at 8: step 4 was never redone
    meta = json.loads((run / "ckpt" / f"step_{D.STEPS:07d}" / "meta.json").read_text())
    assert meta["format"] == "dcp" and meta["world_size"] == 2
