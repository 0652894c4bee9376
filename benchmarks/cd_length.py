"""Quality of Stage-2 inits against their number of updates, scored as `framecast bench toy` scores them.

    python benchmarks/cd_length.py runs/toy/cd_long runs/toy/ode --clips 128 --out docs/cd_length.json

Every `ckpt/step_*` checkpoint of each run samples the benchmark's held-out captions with the benchmark's
noise (`bench.sample_clips`) and is scored by eval/toy.py: mean ± standard error over the clips. The numbers
behind docs/results.md's "CD ≥ ODE" ordering (configs/toy_cd_length.yaml trains the long CD).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from framecast import bench
from framecast.eval import toy as T
from framecast.generate import load
from framecast.train import checkpoint as ckpt


def score_run(run: Path, clips: int) -> list[dict]:
    found = sorted(ckpt.scan(run / "ckpt"))  # (path, why incomplete or None), oldest first
    if not found:
        raise SystemExit(f"{run}: no ckpt/step_* checkpoints")
    rows, captions = [], None
    for path, why in found:
        if why is not None:  # e.g. the one a running stage is writing now
            ckpt.warn_bad(path, why, then="skipped")
            continue
        lm = load(path)
        d = lm.config.data  # one run, one data config: the held-out captions are drawn once
        if captions is None:
            _, captions = T.real_clips(clips, d.num_frames, d.height, d.width, seed=d.seed + 1)
        scores = T.clip_scores(bench.sample_clips(lm, captions, d.num_frames), captions)
        row = {"run": str(run), "step": int(path.name.split("_")[1]), "clips": clips}
        for k in bench.METRICS:
            row[k], row[f"{k}_se"] = float(scores[k].mean()), T.standard_error(scores[k])
        rows.append(row)
        print(f"| `{run}` | {row['step']} | " + " | ".join(f"{row[k]:.3f} ±{row[k + '_se']:.3f}"
                                                         for k in bench.METRICS) + " |", flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--clips", type=int, default=128)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    print("| run | step | " + " | ".join(bench.METRICS) + " |\n|" + "---|" * (2 + len(bench.METRICS)))
    rows = [r for run in a.runs for r in score_run(run, a.clips)]
    if a.out:
        Path(a.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
