"""A picture of open-loop prediction: held-out episodes, real frames vs each stage under the same actions.

    python benchmarks/world_grid.py --runs runs/minigrid --eval data/minigrid_eval --out docs/img/world_model_open_loop.png

Each block is one held-out episode: the first row is the recording, the others are the stages given its
first frame and its recorded actions (open loop, eval/world's open_loop); the action that leads to each
frame is written above it.
"""

import argparse
import sys
from pathlib import Path

STAGES = ["stage1", "dmd_2step", "dmd_1step", "dmd_sf_2step"]
LABELS = {"stage1": "AR teacher", "dmd_2step": "CF++ 2-step", "dmd_1step": "CF++ 1-step",
          "dmd_sf_2step": "SF-init 2-step", "stage0": "bidir. teacher", "cd": "causal CD"}


def main(argv=None) -> int:
    import torch
    from PIL import Image, ImageDraw

    from framecast.data.envs import load_episodes
    from framecast.eval import world as W
    from framecast.generate import load

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", default="runs/minigrid")
    p.add_argument("--eval", default="data/minigrid_eval")
    p.add_argument("--stages", nargs="+", default=STAGES)
    p.add_argument("--episodes", type=int, nargs="+", default=[0, 1, 2, 3])
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--scale", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="docs/img/world_model_open_loop.png")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    ep = load_episodes(args.eval)
    names = ep["manifest"]["actions"]
    idx = torch.tensor(args.episodes)
    frames, actions = ep["frames"][idx, :args.frames], ep["actions"][idx, :args.frames]  # [E, F, 3, H, W], [E, F]
    rows = [("recording", W.to_video(frames))]
    for stage in args.stages:
        path = Path(args.runs) / stage
        if not path.exists():
            print(f"skip {stage}: no {path}")
            continue
        out = W.open_loop(load(path), frames, actions, context=1)  # decoded [E, F-1, 3, H, W]
        rows.append((LABELS.get(stage, stage), torch.cat([W.to_video(frames[:, :1]), out], 1)))
    E, F, _, H, Wd = frames.shape
    s, label_w, head = args.scale, 110, 14
    img = Image.new("RGB", (label_w + F * Wd * s, E * (head + len(rows) * H * s + 6)), (255, 255, 255))
    d = ImageDraw.Draw(img)
    y = 0
    for e in range(E):
        for f in range(F):
            a = int(actions[e, f])
            d.text((label_w + f * Wd * s + 2, y + 1), "start" if a >= len(names) else names[a], fill=(0, 0, 0))
        y += head
        for label, video in rows:
            d.text((4, y + H * s // 2 - 6), label, fill=(0, 0, 0))
            for f in range(F):
                x = ((video[e, f].clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
                img.paste(Image.fromarray(x).resize((Wd * s, H * s), Image.NEAREST), (label_w + f * Wd * s, y))
            y += H * s
        y += 6
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    img.save(args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
