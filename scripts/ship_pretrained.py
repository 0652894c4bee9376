"""Package a trained run as a shipped model, `framecast/pretrained/<name>/` (framecast/pretrained/__init__.py).

    python scripts/ship_pretrained.py toy-base --run runs/toy_base/stage0 --recipe configs/toy_base.yaml \
        --command "framecast pipeline --recipe configs/toy_base.yaml train.threads=2" --scores base_scores.json

Writes the run's EMA weights as one framecast checkpoint (`framecast convert`), then `manifest.json`: the recipe
and command that trained it, its steps and parameters, the scores measured on held-out captions (a JSON line of
benchmarks/base_quality.py), the file's SHA-256 and size. World models (`--start-env minigrid`) also get `start/`,
a small recording of held-out first frames that `framecast play --pretrained <name>` starts sessions from. Prints
the registry line to put in
framecast/pretrained/__init__.py; the shipped folder is never overwritten (move the old one away first).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

from framecast import pretrained
from framecast.data.envs import read_manifest, record
from framecast.eval.world.regression import check_scores
from framecast.generate import convert, load
from framecast.train import checkpoint as ckpt


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("name")
    p.add_argument("--run", required=True, help="the trained run (a run-stage folder or a checkpoint)")
    p.add_argument("--recipe", required=True, help="the recipe that trained it (copied into the manifest)")
    p.add_argument("--command", required=True, help="the command that trained it")
    p.add_argument("--scores", required=True, help="a JSONL file whose last line holds the model's scores")
    p.add_argument("--root", default=str(pretrained.ROOT))
    p.add_argument("--start-env", default="", help="world models: record this environment's start views into "
                   "<name>/start (at the training recording's tile, size, alignment and resampling), so play needs no recording, "
                   "and store the model's regression check (eval/world/regression.py) in the manifest")
    p.add_argument("--start-episodes", type=int, default=16)
    p.add_argument("--start-seed", type=int, default=1, help="held out from training (seed 0)")
    a = p.parse_args()
    out = Path(a.root) / a.name
    src = ckpt.resolve(a.run)
    meta = ckpt.read_meta(src)
    saved = convert(src, out, use_ema=None)  # EMA weights when the run kept them (convert refuses an existing out)
    w = saved / pretrained.WEIGHTS
    digest = pretrained.sha256(w)
    scores = json.loads(Path(a.scores).read_text().strip().splitlines()[-1])
    scores = {k: v for k, v in scores.items() if k not in ("per_clip", "paired")}  # the means and errors, not 128 clips
    params = sum(t.numel() for t in ckpt.load_state_dict(saved, "model").values())
    manifest = {
        "name": a.name, "stage": meta["stage"], "steps": meta["step"], "parameters": params,
        "trained_from": str(src), "weights": "ema_model" if "model" in meta.get("ema", []) else "model",
        "recipe": Path(a.recipe).as_posix(), "recipe_text": Path(a.recipe).read_text(), "command": a.command,
        "scores": scores, "sha256": digest, "bytes": w.stat().st_size,
        "made": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {platform.system()}",
    }
    if a.start_env:  # a recording of first frames only: play's start views (pretrained.start_frames)
        data = meta["config"]["data"]
        rec = read_manifest(data["path"])
        if rec["env"] != a.start_env:
            raise SystemExit(f"the run trained on {rec['env']!r} episodes, not {a.start_env!r}")
        record(a.start_env, out / "start", episodes=a.start_episodes, frames=1, seed=a.start_seed,
               tile=int(rec["tile"]), size=int(rec["size"]), align=rec["align"], resample=rec["resample"],
               progress=False)
        manifest["start"] = {"env": a.start_env, "episodes": a.start_episodes, "seed": a.start_seed}
        # the regression check tests/test_pretrained.py recomputes (eval/world/regression.py)
        manifest["check"] = check_scores(load(saved), rec)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    print(f"{out}: {w.stat().st_size / 1e6:.1f} MB")
    print(f'registry line for framecast/pretrained/__init__.py:\n    "{a.name}": "{digest}",')


if __name__ == "__main__":
    main()
