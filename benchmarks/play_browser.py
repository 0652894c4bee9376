"""End-to-end speed and memory of `framecast play` in headless Chromium, and a gif of a played session.

    python benchmarks/play_browser.py --ckpt runs/minigrid/dmd_2step --start data/minigrid_eval \\
        --frames 1000 --threads 2 --out docs/world_model_play.json --gif docs/img/world_model_play.gif

Run 1 (speed): the server runs uncapped (--fps 0) and the page plays a fixed key script for `--frames`
generated frames; the page measures frames/s from frame arrivals, first-frame latency from page load,
key-to-frame latency, and reads the server's resident memory from every frame header (flat = the rolling KV
cache works). Run 2 (gif): a short capped session whose canvas is read back every frame: four left turns
(a loop), forward, right turns. Needs chromium (apt-get install chromium) and the [play,browser] extras.
"""

import argparse
import base64
import io
import json
import sys
from pathlib import Path

SPEED_SCRIPT = [("ArrowUp", 6), ("", 3), ("ArrowLeft", 1), ("ArrowUp", 4), ("ArrowRight", 2), ("", 2)]
GIF_SCRIPT = [("", 2), ("ArrowLeft", 1), ("", 1), ("ArrowLeft", 1), ("", 1), ("ArrowLeft", 1), ("", 1),
              ("ArrowLeft", 1), ("", 2), ("ArrowUp", 4), ("", 1), ("ArrowRight", 1), ("ArrowUp", 3), ("", 1),
              ("ArrowRight", 1), ("ArrowUp", 3), ("", 2)]


def main(argv=None) -> int:
    import torch

    from framecast.play import load_world
    from framecast.play.drive import Server, drive, find_chromium

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True)
    p.add_argument("--start", default=None, help="recording whose first frames start the sessions")
    p.add_argument("--frames", type=int, default=1000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--gif-frames", type=int, default=48)
    p.add_argument("--out", default=None, help="write the figures as JSON here")
    p.add_argument("--gif", default=None, help="write a gif of a played session here")
    args = p.parse_args(argv)
    exe = find_chromium()
    if exe is None:
        print("no chromium: apt-get install chromium (or set FRAMECAST_CHROMIUM)", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    world = load_world(args.ckpt, start=args.start, fps=0.0, max_sessions=1)
    with Server(world) as server:
        speed = drive(server.url, frames=args.frames, script=SPEED_SCRIPT, chromium=exe, timeout_s=1800)
    speed.pop("canvas")
    result = {"ckpt": args.ckpt, "threads": args.threads, "window": world.window, "steps": world.spec.steps,
              "speed": speed}
    print(json.dumps(result, indent=1))
    if args.gif:
        from PIL import Image

        world = load_world(args.ckpt, start=args.start, fps=8.0, max_sessions=1)
        with Server(world) as server:
            played = drive(server.url, frames=args.gif_frames, script=GIF_SCRIPT, chromium=exe, record_every=1)
        from PIL import ImageDraw

        frames = []
        for url, action in played["canvas"]:  # the frame as the page drew it, captioned with the key it answers
            f = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB")
            f = f.resize((f.width * 6, f.height * 6), Image.NEAREST)
            out = Image.new("RGB", (f.width, f.height + 18), (0, 0, 0))
            out.paste(f, (0, 18))
            ImageDraw.Draw(out).text((4, 3), f"key: {action}", fill=(255, 255, 255))
            frames.append(out)
        Path(args.gif).parent.mkdir(parents=True, exist_ok=True)
        frames[0].save(args.gif, save_all=True, append_images=frames[1:], duration=150, loop=0)
        result["gif"] = {"path": args.gif, "frames": len(frames), "script": GIF_SCRIPT}
        print(f"wrote {args.gif} ({len(frames)} frames)")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
