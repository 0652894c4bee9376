"""World-model metrics of every recipe stage on held-out recorded episodes (docs/world_model.md, metrics).

    python benchmarks/world_metrics.py                                   # runs/minigrid, 64 held-out episodes
    python benchmarks/world_metrics.py --stages stage1 dmd_2step --episodes 16 --threads 2

For each stage with a checkpoint under --runs (loaded with generate.load), eval/world's world_metrics: open
loop from `--context` clean frames of each held-out episode under the recorded actions and under actions
shuffled across episodes (PSNR, SSIM, ΔPSNR), an inverse-dynamics model and a state probe trained on the
REAL training recording reading the generated frames, and MiniGrid loop closure (docs/world_model.md,
metrics). The rows "real frames" (ceiling) and "floor" put the numbers on a scale: the IDM on real held-out
transitions vs their actions / vs shuffled actions, the probe on real frames / its best constant guess.

The IDM and probe are trained once and cached under --cache (default <runs>/eval_cache). Writes
<out>.json (everything, per-horizon curves included) and <out>.md (the table), after every stage, so a
cut-off run keeps what it finished; stages already in <out>.json from a run with the same settings and not
named again are kept, so later stages can be added as they finish. Stages without a checkpoint are skipped
with a message; a stage whose newest checkpoint is not its last step is evaluated and marked unfinished.

stage0 is bidirectional: trained with one noise level for the whole clip, it never saw a clean frame next
to noisy ones. generate.sample still gives it clean context frames (committed to the KV cache, the clip
generated as one block attending to them, I2V-style), so it is evaluated that way and marked: its numbers
say how the teacher does in a setting it was not trained for, not how good its clips are.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from framecast.data.envs import load_episodes
from framecast.eval import world as W
from framecast.generate import load
from framecast.errors import CheckpointError
from framecast.train import checkpoint as ckpt

STAGES = ["stage0", "stage1", "cd", "dmd_1step", "dmd_2step", "ode_sf", "dmd_sf_2step"]
BIDIRECTIONAL_NOTE = ("bidirectional: never trained with clean context frames; open loop via sample()'s cached "
                      "clean context is out of its training distribution")


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", default="runs/minigrid", help="the recipe's run folder (one sub-folder per stage)")
    p.add_argument("--stages", nargs="+", default=STAGES)
    p.add_argument("--ckpt", nargs="+", default=[], metavar="NAME=PATH", help="also evaluate these checkpoints (a "
                   "run-stage folder, one step_N folder, pretrained:<name>) as rows NAME, e.g. an ablation's step")
    p.add_argument("--train", default="data/minigrid_train", help="real recording the IDM and probe learn from")
    p.add_argument("--eval", default="data/minigrid_eval", help="held-out recording")
    p.add_argument("--episodes", type=int, default=64, help="held-out episodes (the first N)")
    p.add_argument("--context", type=int, default=1, help="clean context frames given to the model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--loop-starts", type=int, default=32, help="start frames for loop closure (0: skip)")
    p.add_argument("--steps", type=int, default=None, help="override the sampling steps of multi-step stages")
    p.add_argument("--denoising-steps", type=int, nargs="+", default=None, metavar="T", help="sample few-step "
                   "stages on this step list instead of their own (e.g. 1000 500: a 4-step CD model at 2 steps; the "
                   "first frame keeps its trained schedule)")
    p.add_argument("--window", type=int, default=-1, help="KV-cache frames of causal stages (-1: the training clip "
                   "length, as framecast play streams; 0: unbounded)")
    p.add_argument("--cache", default=None, help="IDM / probe cache (default <runs>/eval_cache)")
    p.add_argument("--idm-steps", type=int, default=1500)
    p.add_argument("--probe-steps", type=int, default=2000)
    p.add_argument("--out", default="docs/world_model_metrics", help="writes <out>.json and <out>.md")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def _fmt(v, digits=2):
    if v is None:
        return "–"
    if isinstance(v, float) and math.isinf(v):
        return "∞"
    return f"{v:.{digits}f}"


def readable(ref: dict, key: str) -> bool:
    """Does the probe read this field from real frames clearly better than a constant guess?"""
    real, const = ref[key], ref[key + "_const"]
    return real > const + 0.1 if key.endswith("_acc") else real < 0.75 * const


def _reference_rows(ref: dict, probe_keys: list[str], layout: bool) -> list[list[str]]:
    """The ceiling (real frames) and floor (shuffled actions / constant guess / frozen world) rows."""
    return [["real frames (ceiling)", "", "∞", "", "", "", "", "1.00", _fmt(ref["idm_acc"], 3), "", "",
             _fmt(ref.get("turn_confused"), 3)]
            + (["1.00", "0"] if layout else []) + [_fmt(ref[k]) for k in probe_keys] + ["∞", "", "∞", ""],
            ["floor (shuffled actions / constant / frozen world)", "", "", "", "0", "", "", "",
             _fmt(ref["idm_acc_shuffled"], 3), "", "", ""]
            + ([_fmt(ref["layout_acc_frozen"], 3), _fmt(ref["ahead_mae_frozen"])] if layout else [])
            + [_fmt(ref[k + "_const"]) for k in probe_keys] + ["", "", "", ""]]


def _stage_row(name: str, r: dict, probe_keys: list[str], layout: bool) -> list[str]:
    m = r["metrics"]
    loop = m.get("loop") or {}
    mark = "" if r["finished"] else " (unfinished)"
    mark += " †" if r.get("note") else ""
    return ([name + mark, str(r["step"]), _fmt(m["psnr"]), _fmt(m["psnr_shuffled"]), _fmt(m["delta_psnr"]),
             _fmt(m["psnr_by_horizon"][0]), _fmt(m["psnr_by_horizon"][-1]), _fmt(m["ssim"], 3),
             _fmt(m.get("idm_acc"), 3), _fmt(m.get("idm_acc_shuffled"), 3),
             _fmt(m.get("idm_acc_followed_shuffled"), 3), _fmt(m.get("turn_confused"), 3)]
            + ([f"{_fmt(m.get(k), 3)} / {_fmt(m.get(k + '_shuffled'), 3)}" for k in ("layout_acc", "ahead_mae")]
               if layout else [])
            + [f"{_fmt(m.get(k))} / {_fmt(m.get(k + '_shuffled'))}" for k in probe_keys]
            + [_fmt(loop.get("loop_psnr")), _fmt(loop.get("half_turn_psnr")), _fmt(loop.get("stay_psnr")),
               f"{r['seconds']:.0f}"])


LEGEND = (
    "PSNR/SSIM: open loop vs the recorded frames (mean over generated frames; h = steps after the context). "
    "ΔPSNR = PSNR(recorded actions) − PSNR(shuffled actions) (docs/world_model.md, metrics). "
    "IDM acc: the inverse-dynamics model (trained on real transitions of "
    "{train}) on generated transitions vs the recorded actions; 'shuf' reads the shuffled-action rollout "
    "against the recorded actions (equal to IDM acc for a model that ignores actions); 'follows shuf' against "
    "the shuffled actions it was given; 'L/R confused': of the recorded left and right turns, the fraction the "
    "IDM reads as the other turn (0.5: it turns, but not which way). Probe columns: model / shuffled-action "
    "rollout, vs the recorded state (accuracy for class fields, mean absolute error in the field's units "
    "otherwise). Layout (MiniGrid, a colour rule): the 7x7 cells of the view read as unseen / floor / wall, "
    "generated vs recorded (cell accuracy) and the error in free cells straight ahead, model / shuffled-action "
    "rollout; its floor is a world that never moves (the context frame held still). Loop closure (MiniGrid): "
    "PSNR to the start view after 4 turns (the same view in the real world), after 2 turns (the opposite "
    "view: the scale of a different view) and after 4 stays.")


def _notes(result: dict, fields: list[str], probe_keys: list[str]) -> list[str]:
    """What follows the table: training of the IDM / probe, unreadable probe fields, marked and skipped stages."""
    notes = ["", f"IDM: {result['idm']['steps']} steps, training loss {result['idm']['final_loss']:.3f}; probe: "
                 f"{result['probe']['steps']} steps, training loss {result['probe']['final_loss']:.3f}."]
    blind = [f for f, k in zip(fields, probe_keys) if not readable(result["reference"], k)]
    if blind:
        notes += ["", f"The probe cannot read {', '.join(blind)} from one real frame (its ceiling is within reach of "
                      "the best constant guess), so those columns say nothing about the models here. MiniGrid's "
                      "view is egocentric: absolute position and heading are not visible in a frame."]
    skipped = [f"- {n}: {r['skipped']}" for n, r in result["stages"].items() if "skipped" in r]
    noted = [f"- † {n}: {r['note']}" for n, r in result["stages"].items() if r.get("note")]
    if noted:
        notes += ["", *noted]
    if skipped:
        notes += ["", "Skipped:", *skipped]
    return notes


def table(result: dict) -> str:
    fields = result["probe"]["fields"]
    kinds = result["probe"]["kinds"]
    probe_keys = [f"probe_{f}_{'acc' if k == 'class' else 'mae'}" for f, k in zip(fields, kinds)]
    probe_heads = [f"{f} {'acc' if k == 'class' else 'MAE'}" for f, k in zip(fields, kinds)]
    layout = "layout_acc_frozen" in result["reference"]  # MiniGrid: the colour-rule layout probe
    lay_heads = ["layout acc", "ahead MAE"] if layout else []
    head = (["stage", "step", "PSNR", "PSNR shuf", "ΔPSNR", "PSNR h=1", "PSNR h=last", "SSIM", "IDM acc",
             "IDM acc shuf", "IDM follows shuf", "L/R confused"] + lay_heads + probe_heads
            + ["loop 4 turns", "2 turns", "stay x4", "eval s"])
    rows = _reference_rows(result["reference"], probe_keys, layout)
    rows += [_stage_row(name, r, probe_keys, layout) for name, r in result["stages"].items() if "skipped" not in r]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    s = result["settings"]
    notes = [f"# World-model metrics ({s['eval']}, first {s['episodes']} episodes, context {s['context']}, "
             f"seed {s['seed']})", "", f"Command (latest run; each stage's own is in the JSON): `{s['command']}`",
             "", "\n".join(lines), "", LEGEND.format(train=s["train"]), *_notes(result, fields, probe_keys)]
    return "\n".join(notes) + "\n"


def write(result: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    out.with_suffix(".md").write_text(table(result))


SAME = ("runs", "train", "eval", "episodes", "context", "seed", "loop_starts", "steps", "denoising_steps", "window",
        "idm_steps", "probe_steps")


def kept(out: Path, args) -> dict:
    """Stages of an earlier <out>.json made with the same settings and not named again: evaluating the stages
    that finished since then adds them to the table instead of replacing it."""
    path = out.with_suffix(".json")
    if not path.exists():
        return {}
    try:
        old = json.loads(path.read_text())
    except json.JSONDecodeError:
        return {}
    if any(old.get("settings", {}).get(k) != getattr(args, k) for k in SAME):
        return {}
    named = set(args.stages) | {_named(c)[0] for c in args.ckpt}
    stages = {k: v for k, v in old.get("stages", {}).items() if k not in named and "skipped" not in v}
    if stages:
        print(f"keeping {', '.join(stages)} from {path} (same settings)", flush=True)
    return stages


def evaluate_stage(path: Path, ep: dict, idm, probe, args) -> dict:
    try:
        src = ckpt.resolve(path)
    except CheckpointError as e:
        return {"skipped": str(e)}  # names the path and what a checkpoint there lacks
    model = load(src)
    spec, cfg = model.spec, model.config
    manifest = ep["manifest"]
    if cfg.model.num_actions != manifest["null_action"]:
        return {"skipped": f"model.num_actions={cfg.model.num_actions}, the recording has {manifest['null_action']} "
                           f"actions"}
    if list(spec.pixel_shape) != list(ep["frames"].shape[2:]):
        return {"skipped": f"the model makes {list(spec.pixel_shape)} frames, the recording has "
                           f"{list(ep['frames'].shape[2:])}"}
    meta = ckpt.read_meta(model.path)
    step, steps = meta.get("step"), cfg.train.steps
    # a converted checkpoint (a shipped package, a released model) restarts its step count at 0 but is complete
    finished = step == steps or "converted_from" in meta
    kw = {"steps": args.steps} if args.steps and not spec.few_step else {}
    if args.denoising_steps and spec.few_step:
        kw["denoising_steps"] = list(args.denoising_steps)
    if spec.causal:  # stream as play does: a rolling cache of the training clip length (relative offsets
        # beyond it were never trained; docs/world_model.md, metrics long-horizon drift)
        kw["window"] = spec.stream_window(None if args.window < 0 else args.window)
    t0 = time.perf_counter()
    m = W.world_metrics(model, ep, idm, probe, context=args.context, seed=args.seed, episodes=args.episodes,
                        loop_starts=args.loop_starts, **kw)
    n_steps = len(kw["denoising_steps"]) if "denoising_steps" in kw else kw.get("steps", spec.steps)
    return {"checkpoint": str(model.path), "step": step, "finished": finished, "train_steps": steps,
            "mode": spec.mode, "sampler": spec.sampler, "sampling_steps": n_steps,
            "window": kw.get("window"), "guidance": spec.guidance,
            "note": None if spec.causal else BIDIRECTIONAL_NOTE, "seconds": time.perf_counter() - t0, "metrics": m}


def _named(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise SystemExit(f"--ckpt takes NAME=PATH, got {text!r}")
    return name, path


def main(argv=None) -> int:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    runs, out = Path(args.runs), Path(args.out)
    cache = Path(args.cache) if args.cache else runs / "eval_cache"
    progress = not args.no_progress
    t0 = time.perf_counter()
    idm, idm_info = W.load_or_train_idm(args.train, cache, steps=args.idm_steps, progress=progress)
    probe, probe_info = W.load_or_train_probe(args.train, cache, steps=args.probe_steps, progress=progress)
    print(f"IDM and probe ready ({time.perf_counter() - t0:.0f} s, cache {cache})", flush=True)
    ep = load_episodes(args.eval)
    ref = W.real_reference(ep, idm, probe, context=args.context, episodes=args.episodes)
    print("real frames (ceiling) / floor:", json.dumps(ref), flush=True)
    result = {"settings": {**vars(args), "command": " ".join(["python", *sys.argv])},
              "idm": {k: idm_info[k] for k in ("steps", "seed", "final_loss")},
              "probe": {k: probe_info[k] for k in ("steps", "seed", "final_loss", "fields", "kinds", "classes")},
              "reference": ref, "stages": kept(out, args)}
    write(result, out)
    rows = [(n, runs / n) for n in args.stages] + [_named(c) for c in args.ckpt]
    for name, path in rows:
        r = {**evaluate_stage(path, ep, idm, probe, args), "command": result["settings"]["command"]}
        result["stages"][name] = r
        if "skipped" in r:
            print(f"== {name}: skipped ({r['skipped']})", flush=True)
        else:
            m = r["metrics"]
            print(f"== {name} (step {r['step']}/{r['train_steps']}, {r['seconds']:.0f} s): "
                  f"psnr {m['psnr']:.2f} shuffled {m['psnr_shuffled']:.2f} Δ {m['delta_psnr']:.2f}, "
                  f"IDM {m['idm_acc']:.3f} shuffled {m['idm_acc_shuffled']:.3f}, "
                  f"loop {json.dumps({k: v for k, v in (m['loop'] or {}).items() if k != 'by_step'})}", flush=True)
        write(result, out)
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')} ({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
