"""World-model quality against play length: 1000-frame open-loop sessions scored per 100 frames against the
real environment replaying the same actions (framecast/eval/world/long_play.py; docs/world_model.md, "Long play").

    python benchmarks/world_long_play.py --ckpt runs/minigrid/dmd_2step --train data/minigrid_train \
        --episodes 8 --out docs/world_long_play

Records (once, resumable) `--record`: held-out episodes of `--frames` frames under the recording's exploration
policy (seed `--seed`, not a training seed), keeps the first `--episodes` that never restart (goal reached: a
new map), streams each from its first frame with the play window, and prints the per-bucket table. Writes
<out>.json and <out>.md.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from framecast.data.envs import load_episodes, read_manifest, record
from framecast.eval import world as W
from framecast.eval.world.long_play import continuous_length, drift, long_play
from framecast.generate import load


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", required=True, help="a causal world-model checkpoint (or pretrained:<name>)")
    p.add_argument("--train", default="data/minigrid_train", help="real recording the IDM learns from")
    p.add_argument("--record", default=None, help="the long held-out recording, made if absent (default: "
                   "data/minigrid_long_eval_<align>, at the alignment of --train's recording, which the model saw)")
    p.add_argument("--env", default="minigrid")
    p.add_argument("--frames", type=int, default=1001, help="frames per episode (the first is the start view)")
    p.add_argument("--episodes", type=int, default=8, help="continuous episodes to score")
    p.add_argument("--record-episodes", type=int, default=32, help="episodes recorded to find them")
    p.add_argument("--seed", type=int, default=2, help="recording seed (0 trains, 1 is the short held-out set)")
    p.add_argument("--bucket", type=int, default=100)
    p.add_argument("--window", type=int, default=None, help="KV-cache frames (default: the play window)")
    p.add_argument("--cache", default="runs/eval_cache", help="where the IDM is cached")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    align = read_manifest(a.train)["align"]  # the view layout the model (and the IDM) learnt from
    rec = Path(a.record or f"data/minigrid_long_eval_{align}")
    record(a.env, rec, episodes=a.record_episodes, frames=a.frames, seed=a.seed, align=align)
    ep, manifest = load_episodes(rec), read_manifest(rec)
    keep = [i for i, s in enumerate(ep["state"]) if continuous_length(s) == a.frames][: a.episodes]
    if not keep:
        raise SystemExit(f"no episode of {rec} runs {a.frames} frames without a restart; record more")
    model = load(a.ckpt)
    cache = Path(a.cache)
    idm, _ = W.load_or_train_idm(a.train, cache)
    t = time.perf_counter()
    out = long_play(model, ep["frames"][keep], ep["actions"][keep], manifest, idm=idm, bucket=a.bucket, window=a.window)
    out.update(ckpt=a.ckpt, record=str(rec), episode_ids=keep, seconds=round(time.perf_counter() - t, 1),
               layout_drift=drift(out, "layout_acc") if "layout_acc" in out["buckets"][0] else None,
               idm_drift=drift(out, "idm_acc"))
    lines = [f"{len(keep)} episodes x {a.frames} frames of {rec} (seed {a.seed}), window {out['window']}, "
             f"{a.ckpt}", "", "| frames | layout acc | IDM acc | IDM on real | PSNR |", "|---|---|---|---|---|"]
    for r in out["buckets"]:
        lines.append(f"| {r['start']}-{r['end'] - 1} | {r.get('layout_acc', float('nan')):.3f} | {r['idm_acc']:.3f} "
                     f"| {r['real_idm_acc']:.3f} | {r['psnr']:.2f} |")
    lines.append("")
    lines.append(f"last vs first bucket: layout {out['layout_drift']:+.1%}, IDM {out['idm_drift']:+.1%} "
                 f"({out['seconds']} s)")
    print("\n".join(lines))
    if a.out:
        Path(f"{a.out}.json").write_text(json.dumps(out, indent=1))
        Path(f"{a.out}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
