"""The regression check of a shipped world model (framecast/pretrained; tests/test_pretrained.py).

`check_scores` records a few held-out episodes (deterministic per seed, as `framecast record` writes them),
streams the model open loop over them under the recorded and the shuffled actions (`world_metrics`, the
benchmark's own function) and returns the scores that need no learned probe: PSNR, ΔPSNR and, for MiniGrid,
layout accuracy. scripts/ship_pretrained.py stores them in the model's manifest (`check`); the test recomputes
them, so a change anywhere on the path from the weights to the streamed frames that moves them fails.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from ...data.envs import load_episodes, read_manifest, record
from ...generate import LoadedModel
from .report import world_metrics

KEYS = ("psnr", "psnr_shuffled", "delta_psnr", "layout_acc", "layout_acc_shuffled")


def check_scores(model: LoadedModel, recording: dict, *, episodes: int = 8, frames: int = 8, seed: int = 1) -> dict:
    """Scores of `model` on `episodes` held-out episodes of `frames` frames recorded with `seed`, at the tile and
    size of `recording` (the training recording's manifest: env, tile, size, align, resample)."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "check"
        record(recording["env"], root, episodes=episodes, frames=frames, seed=seed, tile=int(recording["tile"]),
               size=int(recording["size"]), align=recording.get("align", "center"),
               resample=recording.get("resample", "area"), progress=False)
        ep = load_episodes(root)
        m = world_metrics(model, ep, None, None, loop_starts=0)
        man = read_manifest(root)
    out = {k: float(m[k]) for k in KEYS if k in m}
    return {"episodes": episodes, "frames": frames, "seed": seed, "env": man["env"], "tile": int(man["tile"]),
            "size": int(man["size"]), "align": man["align"], "resample": man["resample"], "scores": out}
