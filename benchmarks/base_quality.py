"""Score bidirectional toy bases on held-out captions: the numbers behind docs/results.md's base ablations.

    python benchmarks/base_quality.py runs/abl/*/stage0 --clips 32 --steps 48 --out /tmp/abl.json

Each checkpoint samples the same held-out captions (data seed + 1, as `framecast bench toy` uses) with the
same noise seed, `--steps` Euler steps and the checkpoint's own CFG, and is scored by eval/toy.py. One JSON
line per checkpoint: fidelity, consistency, dynamic, smoothness, instruction, each with its standard error over
the clips (`<metric>_se`), `speed_ratio` (how fast objects move against the captioned speed, eval/toy.py;
1 is exact), the seconds it took, and in `--out` the per-clip scores. With several checkpoints,
each after the first also gets `paired`: per metric its mean difference to the first checkpoint on the same
clips and noise, the standard error of that difference and z = difference / error (framecast/bench.py's paired
comparison), which is what decides whether a retrained base is better than the shipped one.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from framecast import bench
from framecast.eval import toy as T
from framecast.generate import load
from framecast.media import labelled_rows


def score(ckpt: str, clips: int, steps: int, seed: int = 1000, guidance: float | None = None,
          gif: str = "") -> dict:
    lm = load(ckpt)
    d = lm.spec
    _, h, w = d.pixel_shape
    real, captions = T.real_clips(clips, d.num_frames, h, w, seed=1)
    t = time.perf_counter()
    kw = {"guidance": guidance} if guidance is not None else {}
    video = torch.cat([lm.sample(captions[i:i + 32], num_frames=d.num_frames, seed=seed + i, steps=steps, **kw)
                       for i in range(0, clips, 32)])
    if gif:  # the first 6 held-out captions: real clips above, the model's below
        labelled_rows([("real clips", real[:6]), (f"{Path(ckpt).name}\n{steps} steps", video[:6])], gif, fps=6)
    fits = T.fit_frames(video)  # once, for the scores and the speed ratio
    per_clip = {k: v.tolist() for k, v in T.clip_scores(fits, captions).items()}
    per_clip["speed_ratio"] = T.speed_ratio(fits, captions).tolist()  # 1 = the captioned speed
    row = {"ckpt": ckpt, "clips": clips, "steps": steps, **{k: float(sum(v) / len(v)) for k, v in per_clip.items()},
           **{f"{k}_se": T.standard_error(v) for k, v in per_clip.items() if k in PAIRED},
           "seconds": round(time.perf_counter() - t, 1), "per_clip": per_clip}
    return row


PAIRED = bench.METRICS  # the benchmark's metrics, compared as its orderings are


def paired(row: dict, first: dict) -> dict[str, str]:
    """Per metric `diff ±se (z)` of `row` minus `first`, clip by clip (both sampled the same clips and noise)."""
    return {k: bench.paired_cell(c) for k, c in bench.paired(row["per_clip"], first["per_clip"]).items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("ckpts", nargs="+")
    p.add_argument("--clips", type=int, default=32)
    p.add_argument("--steps", type=int, default=48)
    p.add_argument("--guidance", type=float, default=None)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", default="", help="append each JSON line to this file")
    p.add_argument("--gif", default="", help="write real clips and the (last) model's samples of 6 captions here")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    first = None
    for c in a.ckpts:
        row = score(c, a.clips, a.steps, guidance=a.guidance, gif=a.gif if c == a.ckpts[-1] else "")
        if first is None:
            first = row
        else:
            row["paired"] = paired(row, first)
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items() if k != "per_clip"}),
              flush=True)
        if a.out:
            with Path(a.out).open("a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
