"""Plot base-model ablation curves: each metric against training steps, one line per run.

    python benchmarks/base_quality.py runs/abl/w128_l4/stage0/ckpt/step_000{1,2,3}000 ... --out scores.jsonl
    python benchmarks/base_curves.py scores.jsonl --out docs/img/toy_base_ablation.png

Reads the JSON lines `benchmarks/base_quality.py` wrote (one per checkpoint). A checkpoint's run is the folder
above `stage0/`, its step the number in `step_<n>`; a row without one (a shipped name) is left out. Error bars
are standard errors over the per-clip scores base_quality stored. `speed_ratio` is drawn against its real-clip
value, 1 (the dashed line). It also prints the table the plot shows.
"""

from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from pathlib import Path

from framecast.eval.toy import standard_error

METRICS = ("fidelity", "dynamic_degree", "motion_smoothness", "instruction_following", "speed_ratio")


def stat(row: dict, metric: str) -> tuple[float, float]:
    """(mean, standard error) of a metric over the row's clips; nan where the row lacks it, and for the speed
    ratio of a model that draws no object in most frames (its fits, and so its speeds, mean nothing)."""
    clips = row.get("per_clip", {}).get(metric)
    if not clips or (metric == "speed_ratio" and row.get("recognised", 1.0) < 0.5):
        return float("nan"), float("nan")
    return sum(clips) / len(clips), standard_error(clips)


def parse(path: str) -> dict[str, list[tuple[int, dict]]]:
    """run name -> [(step, row)] sorted by step."""
    runs: dict[str, list[tuple[int, dict]]] = defaultdict(list)
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        m = re.search(r"([^/]+)/stage0/ckpt/step_(\d+)", row["ckpt"])
        if m:
            runs[m.group(1)].append((int(m.group(2)), row))
    if not runs:
        raise SystemExit(f"{path}: no row names a `<run>/stage0/ckpt/step_<n>` checkpoint")
    return {k: sorted(v, key=lambda t: t[0]) for k, v in sorted(runs.items())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("scores", help="JSON lines from benchmarks/base_quality.py --out")
    p.add_argument("--out", required=True, help="the PNG to write")
    a = p.parse_args()
    runs = parse(a.scores)
    print("| run | step | " + " | ".join(METRICS) + " |")
    print("|---|---|" + "---|" * len(METRICS))
    for name, rows in runs.items():
        for step, row in rows:
            cells = ["{:.3f} ±{:.3f}".format(*stat(row, m)) for m in METRICS]
            print(f"| {name} | {step} | " + " | ".join(cells) + " |")

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(METRICS), figsize=(4 * len(METRICS), 3.4))
    for ax, metric in zip(axes, METRICS):
        for name, rows in runs.items():
            xs = [s for s, _ in rows]
            ys, es = zip(*(stat(r, metric) for _, r in rows))
            ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=name)
        ax.set_title(metric.replace("_", " "))
        ax.set_xlabel("training steps")
        ax.set_ylim(0, 1.1)
        if metric == "speed_ratio":
            ax.axhline(1.0, color="k", ls="--", lw=1)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(a.out, dpi=110)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
