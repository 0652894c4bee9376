"""Train Stage 1, causal CD and DMD on the tiny preset, in one process or under torchrun (tests/test_distributed.py).

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/dist_driver.py OUT INPUTS --accum 1
    python tests/dist_driver.py OUT INPUTS --accum 2          # the same global batch in one process

INPUTS holds `stage0/` and `stage1/` checkpoints made once in one process (`make_inputs`), so every run of a
stage starts from the same weights. Each rank writes `OUT/<stage>/rank<r>.json`: the bytes of its local shards
of every network (checked against the planner) and its world size.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from framecast import config as C  # noqa: E402

STAGES = ("stage1", "cd", "dmd")  # the acceptance stages; ALL adds Stage 0 from scratch and the causal ODE
ALL = ("stage0", "stage1", "ode", "cd", "dmd")
STEPS, CKPT_EVERY, BATCH = 10, 4, 2
EXTRA: list[str] = []  # `--set key=value ...`: more overrides for every stage


def base(out: Path, accum: int, batch: int = BATCH) -> list[str]:
    return [f"out_dir={out.parent}", f"name={out.name}", f"train.steps={STEPS}", f"train.ckpt_every={CKPT_EVERY}",
            f"train.batch_size={batch}", f"train.grad_accum={accum}", "train.log_every=1", "train.progress=false",
            "train.threads=1", "train.ema_decay=0.9", *EXTRA, "sample.steps=2", "data.num_frames=4"]


def stage_overrides(stage: str, inputs: Path) -> list[str]:
    s0, s1 = inputs / "stage0", inputs / "stage1"
    return {
        "stage0": ["stage=stage0"],
        "stage1": ["stage=stage1", f"init={s0}"],
        "ode": ["stage=ode", f"init={s1}", f"ode.teacher={s1}", "ode.grid_steps=8", "ode.num_pairs=8",
                "ode.shard_size=4", "few_step.denoising_steps=[1000,500]"],
        "cd": ["stage=cd", f"init={s1}", f"cd.teacher={s1}", "cd.grid_steps=8", "few_step.denoising_steps=[1000,500]"],
        "dmd": ["stage=dmd", f"init={s1}", f"dmd.real={s0}", f"dmd.critic={s0}", "dmd.critic_ratio=2",
                "few_step.denoising_steps=[1000,500]", "dmd.critic_lr=1e-3"],
    }[stage]


def config(stage: str, out: Path, inputs: Path, accum: int, batch: int = BATCH) -> C.RunConfig:
    return C.load(ROOT / "configs" / "tiny.yaml", [*base(out, accum, batch), *stage_overrides(stage, inputs)])


def make_inputs(inputs: Path) -> None:
    """The stage0 and stage1 checkpoints every run starts from (one process, 4 steps each)."""
    from framecast.recipe import train_stage

    common = [f"out_dir={inputs.parent}", f"name={inputs.name}", "train.steps=4", "train.progress=false",
              "data.num_frames=4", "sample.steps=2"]
    s0 = train_stage(C.load(ROOT / "configs" / "tiny.yaml", [*common, "stage=stage0"]))
    s1 = train_stage(C.load(ROOT / "configs" / "tiny.yaml", [*common, "stage=stage1", f"init={s0}"]))
    for name, ck in (("stage0", s0), ("stage1", s1)):
        link = inputs / name
        if not link.exists():
            link.symlink_to(ck)


def shard_bytes(objective) -> dict[str, int]:
    """Bytes of this rank's local shards of every network the stage holds."""
    from framecast.train.distributed import local

    nets = {**objective.roles, **{f"obj_{k}": v for k, v in objective.state_modules().items()},
            **{f"frozen_{k}": v for k, v in objective.frozen_modules().items()}}
    return {n: sum(local(p).numel() * local(p).element_size() for p in m.parameters()) for n, m in nets.items()}


def check_load(folders: list[Path], out: Path) -> None:
    """Each Wan/framecast folder loaded into a meta-built, sharded denoiser (each rank reading only its rows),
    gathered back and compared on rank 0 with the whole load of one process; writes OUT/load_rank<r>.json."""
    import torch

    from framecast.generate import build_denoiser, describe, load
    from framecast.models import wan
    from framecast.train import distributed
    from framecast.train.sharded_load import materialise

    dist = distributed.init("cpu")
    result = {}
    for folder in folders:
        mc, _ = describe(folder)
        net = build_denoiser(mc, "meta")
        distributed.shard(net, dist)
        materialise([net], {id(net): str(folder)}, net, dist)
        local = sum(distributed.local(p).numel() for p in net.parameters())
        full = {k: distributed.full_value(v) for k, v in net.state_dict().items()}
        if (folder / "meta.json").is_file():
            want = load(folder).denoiser.state_dict()
        else:  # a Wan folder: the transformer as one process loads it whole
            want = {f"net.{k}": v for k, v in wan.load_transformer(folder)[0].state_dict().items()}
        same = sorted(full) == sorted(want) and all(torch.equal(full[k], want[k].to(full[k].dtype)) for k in want)
        result[folder.name] = {"local_params": local, "params": sum(v.numel() for v in want.values()), "same": same}
    (out / f"load_rank{dist.rank}.json").write_text(json.dumps(result))
    distributed.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("inputs", type=Path)
    ap.add_argument("--accum", type=int, default=1)
    ap.add_argument("--batch", type=int, default=BATCH)
    ap.add_argument("--stages", default=",".join(ALL))
    ap.add_argument("--set", nargs="*", default=[], help="more overrides for every stage, e.g. dist.mixed_precision=bf16")
    ap.add_argument("--check-load", nargs="*", type=Path, default=None, help="folders to load sharded (only)")
    args = ap.parse_args()
    EXTRA.extend(args.set)
    if args.check_load is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        return check_load(args.check_load, args.out)
    import torch

    torch.set_num_threads(1)
    from framecast.recipe import train_stage
    from framecast.train import distributed

    from framecast import recipe

    report = {}
    original = recipe.shard_and_load

    def recording(objective, dist, *args, **kw):  # the stage's networks, once sharded and loaded
        original(objective, dist, *args, **kw)
        report.update(world=dist.world, bytes=shard_bytes(objective))

    recipe.shard_and_load = recording
    for stage in args.stages.split(","):
        out = args.out / stage  # the run folder: out_dir / name / stage
        ck = train_stage(config(stage, args.out, args.inputs, args.accum, args.batch))
        rank = int(os.environ.get("RANK", 0))
        (out / f"rank{rank}.json").write_text(json.dumps({**report, "checkpoint": str(ck)}))
    distributed.close()


if __name__ == "__main__":
    main()
