"""The CLI verbs that make training data: `record` (environment episodes) and `prepare` (video / prompt stores).

    framecast record minigrid --out data/minigrid --episodes 512
    framecast prepare --config configs/wan2.1-1.3b/data.yaml --videos clips/ --captions captions.json --out data/wan
    torchrun --nproc_per_node 8 -m framecast.cli prepare ...   # shards split across ranks
"""

from __future__ import annotations

import argparse

from . import schema as S

POS, SEED = S.arg_type(int, S.POSITIVE), S.arg_type(int, S.SEED)


def record(args: argparse.Namespace) -> None:
    from .data.envs import record

    path = record(args.env, args.out, episodes=args.episodes, frames=args.frames, seed=args.seed, tile=args.tile,
                  size=args.size, shard_size=args.shard_size, align=args.align,
                  turn_repeat=args.turn_repeat, resample=args.resample)
    print(f"recorded {args.episodes} episodes x {args.frames} frames: {path.parent}")


def add_record(sub) -> None:
    from .data.envs import ALIGNS, ENVS, RESAMPLES

    w = sub.add_parser("record", help="record episodes (frames + actions) from an environment; resumable")
    w.add_argument("env", choices=sorted(ENVS), help="the environment (data/envs.py)")
    w.add_argument("--out", required=True, help="folder for the manifest and shards")
    w.add_argument("--episodes", type=POS, default=512)
    w.add_argument("--frames", type=POS, default=16, help="frames per episode (the first is the reset view)")
    w.add_argument("--seed", type=SEED, default=0, help="episode e uses seed (seed, e): held-out data = another seed")
    w.add_argument("--tile", type=POS, default=4, help="pixels per grid cell of the 7x7 egocentric view")
    w.add_argument("--size", type=POS, default=None,
                   help="frame size: MiniGrid views are padded to it (default 32), Breakout shrunk (default 32)")
    w.add_argument("--shard-size", type=POS, default=64, help="episodes per shard")
    w.add_argument("--align", choices=ALIGNS, default="center",
                   help="MiniGrid: where the view sits in its padded frame; tile = on the tile grid, so that with "
                        "patch = tile each token is one cell (docs/world_model.md)")
    w.add_argument("--turn-repeat", type=float, default=0.0,
                   help="MiniGrid: chance that a turn is followed by the same turn (runs of turns close loops)")
    w.add_argument("--resample", choices=RESAMPLES, default="area",
                   help="Breakout: how the screen is shrunk; max keeps thin objects (paddle, ball) at full colour")
    w.set_defaults(fn=record)


def prepare(args: argparse.Namespace) -> None:
    from .data.prepare import run

    run(args)


def add_prepare(sub) -> None:
    from .data.prepare import add_arguments

    p = sub.add_parser("prepare", help="encode a folder of captioned videos (or a prompts file) into a sharded "
                       "training store; resumable, split across ranks under torchrun")
    add_arguments(p)
    p.set_defaults(fn=prepare)
