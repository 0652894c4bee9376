"""`framecast <verb>`: train, sample, quickstart.

    framecast train --config configs/toy.yaml stage=stage1 init=runs/toy/stage0 train.steps=200
    framecast sample --ckpt runs/toy/stage1 --prompt "a red circle moving right slow" --frames 16
    framecast quickstart                      # Stage 0 + Stage 1 on the toy, then a streamed sample

Errors that come from the user's input (config keys, shapes, checkpoints) print one line and exit 2.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from . import config as C

QUICKSTART_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"


def _train(args: argparse.Namespace) -> None:
    from .pipeline import train_stage

    cfg = C.load(args.config, args.overrides)
    path = train_stage(cfg)
    print(f"checkpoint: {path}")


def _sample(args: argparse.Namespace) -> None:
    import torch

    from .media import grid, write_video
    from .models.conditioning import Cond, build_text_encoder
    from .pipeline import load_model, sample

    model, meta, cfg = load_model(args.ckpt, use_ema=args.ema)
    sm = meta["sampling"]
    enc = build_text_encoder(sm["text_encoder"], cfg.model.text_dim, sm["text_tokens"], cfg.data.seed)
    prompts = args.prompt or cfg.sample.prompts
    prompts = [p for p in prompts for _ in range(args.num)]
    cond, null = Cond(enc.encode(prompts)), Cond(enc.encode([""] * len(prompts)))
    t0 = time.perf_counter()
    video = sample(model, sm, cond, null, num_frames=args.frames or sm["num_frames"], seed=args.seed,
                   steps=args.steps, guidance=args.guidance, window=args.window)
    dt = time.perf_counter() - t0
    out = Path(args.out)
    if out.suffix in (".gif", ".mp4", ".pt"):
        out = out.with_suffix("")
    path = {ext: out.with_name(f"{out.name}.{ext}") for ext in ("gif", "mp4", "pt")}  # keeps dots in names
    for ext in ("gif", "mp4"):
        write_video(grid(video), path[ext], fps=cfg.sample.fps)
    if args.save_tensor:
        torch.save(video, path["pt"])
    print(f"wrote {path['gif']} and .mp4: {video.shape[0]} videos x {video.shape[1]} frames "
          f"in {dt:.1f}s ({video.shape[0] * video.shape[1] / dt:.1f} frames/s)")


def _quickstart(args: argparse.Namespace) -> None:
    from .quickstart import run

    run(QUICKSTART_CONFIG, args.overrides, out_dir=args.out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="framecast", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="verb", required=True)

    t = sub.add_parser("train", help="train one stage from a YAML recipe plus key=value overrides")
    t.add_argument("--config", default=None, help="YAML recipe (defaults if omitted)")
    t.add_argument("overrides", nargs="*", help="strict overrides, e.g. train.steps=100 model.preset=toy")
    t.set_defaults(fn=_train)

    s = sub.add_parser("sample", help="sample a video from a checkpoint (writes .gif and .mp4)")
    s.add_argument("--ckpt", required=True, help="checkpoint dir, ckpt/ root or run-stage dir")
    s.add_argument("--prompt", action="append", help="prompt (repeatable); default: the run's sample prompts")
    s.add_argument("--num", type=int, default=1, help="videos per prompt")
    s.add_argument("--frames", type=int, default=0, help="frames to generate (default: training length)")
    s.add_argument("--steps", type=int, default=None, help="Euler steps per block")
    s.add_argument("--guidance", type=float, default=None, help="CFG scale")
    s.add_argument("--window", type=int, default=None, help="attention window in frames (streaming)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--ema", action=argparse.BooleanOptionalAction, default=None, help="use EMA weights")
    s.add_argument("--out", default="sample", help="output path without extension")
    s.add_argument("--save-tensor", action="store_true", help="also save the raw frames as .pt")
    s.set_defaults(fn=_sample)

    q = sub.add_parser("quickstart", help="the main job: toy Stage 0 + Stage 1, then a streamed sample + report")
    q.add_argument("--out", default="runs", help="where runs are written")
    q.add_argument("overrides", nargs="*", help="overrides applied to both stages, e.g. train.threads=2")
    q.set_defaults(fn=_quickstart)

    args = p.parse_args(argv)
    from .train.checkpoint import CheckpointError

    try:
        args.fn(args)
    except (C.ConfigError, CheckpointError, ValueError) as e:
        print(f"framecast: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
