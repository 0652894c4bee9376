"""What a MiniGrid world model can reach from its context frames: the layout-accuracy ceiling of an oracle
(framecast/eval/world/ceiling.py) against the frozen world, for several context lengths.

    python benchmarks/world_ceiling.py data/minigrid_eval --context 1 2 4 8 --out docs/world_ceiling.json

docs/world_model.md, "What one frame determines", has the table this prints.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from framecast.data.envs import load_episodes, read_manifest
from framecast.eval.world.ceiling import context_ceiling


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("root", help="a MiniGrid recording (framecast record minigrid)")
    ap.add_argument("--context", type=int, nargs="+", default=[1])
    ap.add_argument("--episodes", type=int, default=0, help="the first N episodes (0: all)")
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    ep, manifest = load_episodes(a.root), read_manifest(a.root)
    if manifest.get("env") not in (None, "minigrid"):
        raise SystemExit(f"{a.root} is a {manifest['env']!r} recording; the ceiling reads MiniGrid's layout")
    n = a.episodes or ep["frames"].shape[0]
    rows = {}
    print("| context frames | frames scored | never-seen cells | oracle layout acc | frozen world |")
    print("|---|---|---|---|---|")
    for c in a.context:
        r = context_ceiling(ep["frames"][:n], ep["state"][:n], manifest, context=c)
        rows[c] = r
        print(f"| {c} | {ep['frames'].shape[1] - c} | {r['novel_frac']:.3f} | {r['layout_acc_ceiling']:.3f} "
              f"| {r['layout_acc_frozen']:.3f} |")
    if a.out:
        Path(a.out).write_text(json.dumps({"root": str(a.root), "episodes": n, "by_context": rows}, indent=1))


if __name__ == "__main__":
    main()
