"""`framecast <verb>`: train, pairs, pipeline, prepare, quickstart, sample, inspect, convert, record, play, bench.

    framecast pipeline --recipe configs/toy_framewise_2step.yaml      # stage0 -> 1 -> cd -> dmd, resumable
    framecast train --config configs/toy.yaml stage=cd init=runs/toy/stage1 cd.teacher=runs/toy/stage1
    framecast sample --model causal-forcing++/framewise-2step.pt --base Wan2.1-T2V-1.3B/ --out fox.mp4
    framecast play --model runs/minigrid/dmd_2step --start data/minigrid_eval   # live, in the browser
    framecast quickstart                      # the main job on the toy, then a streamed sample + report

Errors from the user's input (`framecast.errors.UserError`: config keys, checkpoints, data, requests) print
one line and exit 2; anything else is a bug and keeps its traceback. Choices come from the registries."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

from . import cli_data
from . import config as C
from . import schema as S
from .errors import UserError

# argument types: a bad value is one line naming the flag, before any work (schema.py holds the rules)
POS, NONNEG, SEED, PORT = (S.arg_type(int, r) for r in (S.POSITIVE, S.NON_NEGATIVE, S.SEED, S.PORT))
FINITE, FPS = S.arg_type(float, S.FINITE), S.arg_type(float, S.FINITE_NON_NEGATIVE)
DEVICE, FOLDER = S.arg_type(str, problem=S.device_problem), S.arg_type(str, problem=S.folder_problem)


def _train(args: argparse.Namespace) -> None:
    from .recipe import train_stage

    print(f"checkpoint: {train_stage(C.load(args.config, args.overrides), allow_change=args.allow_config_change)}")


def _pairs(args: argparse.Namespace) -> None:
    from .stages import make_pairs

    cfg = C.load(args.config, ["stage=ode", *args.overrides])
    store = make_pairs(cfg)
    store.verify()  # every shard readable, of its manifest's shapes, finite: a damaged one is named
    print(f"pair store: {store.root} ({store.manifest['num_pairs']} trajectories in {store.num_shards} shards)")


def _pipeline(args: argparse.Namespace) -> None:
    from .recipe import run_recipe, split_only

    if args.plan:  # per-rank memory of every stage (plan/), nothing is built
        from .plan import plan_main

        return print(plan_main(args.recipe, args.overrides, args.gpus, args.gpu_memory, args.role))
    only, extra = split_only(args.only) if args.only else (None, [])  # `--only a b key=value`
    results = run_recipe(args.recipe, [*args.overrides, *extra], out_dir=args.out, only=only,
                         allow_change=args.allow_config_change)
    for r in results:
        print(f"{r.key:>12}: {'reused' if r.reused else f'{r.seconds:.0f} s'}  {r.ckpt}")


def _context(m, args):
    """Clean context latents [1, P, C, h, w] from --image (I2V) or --video (continuation), or None."""
    from .media import read_image, read_video

    _, H, W = m.spec.pixel_shape
    if args.image and args.video:
        raise C.ConfigError("give --image (image-to-video) or --video (continuation), not both")
    if args.image:
        pixels = read_image(args.image, H, W)[None, None]  # [1, 1, 3, H, W]
    elif args.video:
        pixels = read_video(args.video, H, W)[None]  # [1, F, 3, H, W]
        j = 1
        while m.codec.pixel_frames(j + 1) <= pixels.shape[1]:
            j += 1
        pixels = pixels[:, :m.codec.pixel_frames(j)]  # the whole latent frames only (Wan VAE: 1 + 4k frames)
    else:
        return None
    return m.codec.encode(pixels.to(next(m.denoiser.parameters())))


def _sample(args: argparse.Namespace) -> None:
    import torch

    from .generate import load

    if args.denoising_steps and not (S.STEP_LIST.ok(args.denoising_steps) and max(args.denoising_steps) <= 1000):
        raise C.ConfigError(f"--denoising-steps {args.denoising_steps}: give strictly decreasing steps in 1..1000, "
                            f"e.g. 1000 500")
    if args.threads:
        torch.set_num_threads(args.threads)
    m = load(args.model, base=args.base, use_ema=args.ema, device=args.device, preset=args.preset)
    print(f"model: {describe_loaded(m)}", flush=True)
    if args.height or args.width:
        m = m.at_size(args.height or m.spec.pixel_shape[1], args.width or m.spec.pixel_shape[2])
    if args.negative_prompt is not None:
        m = dataclasses.replace(m, spec=m.spec.replace(negative_prompt=args.negative_prompt))
    prompts = args.prompt or m.config.sample.prompts
    prompts = [p for p in prompts for _ in range(args.num)]
    ctx = _context(m, args)
    total = m.codec.latent_frames(args.frames) if args.frames else m.spec.num_frames  # latent frames out
    P = 0 if ctx is None else ctx.shape[1]
    if total <= P:
        raise C.ConfigError(f"--frames {args.frames} leaves nothing to generate after the {P} context latent frames")
    t0 = time.perf_counter()
    latents = m.sample_latents(prompts, num_frames=total - P, seed=args.seed, steps=args.steps, guidance=args.guidance,
                               window=args.window, sink=args.sink, sampler=args.sampler,
                               denoising_steps=args.denoising_steps, force=args.force,
                               context=None if ctx is None else ctx.expand(len(prompts), *ctx.shape[1:]))
    if ctx is not None:
        latents = torch.cat([ctx.expand(len(prompts), *ctx.shape[1:]), latents], dim=1)
    video = m.decode(latents)  # the one decode point of this output path
    dt = time.perf_counter() - t0
    _write_sample(video, Path(args.out), m.config.sample.fps, args.save_tensor)
    print(f"wrote {args.out}: {video.shape[0]} videos x {video.shape[1]} frames of {video.shape[3]}x{video.shape[4]} "
          f"in {dt:.1f}s ({video.shape[0] * video.shape[1] / dt:.1f} frames/s)")


def describe_loaded(m) -> str:
    """One line saying what was loaded: format, which weights, the sampling preset and spec."""
    i = m.info
    parts = [f"{i.get('format', '?')} {i.get('path', '')}", i.get("key") and f"weights {i['key']}",
             i.get("preset") and f"preset {i['preset']}", m.spec.describe()]
    return "; ".join(p for p in parts if p)


def _write_sample(video, out: Path, fps: int, save_tensor: bool) -> None:
    """`out` with a .gif/.mp4 suffix: that file; without one: both (and .pt with save_tensor)."""
    import torch

    from .media import display_scale, grid, write_video

    clip = video[0] if video.shape[0] == 1 else grid(video)  # [F, 3, H, W]
    scale = display_scale(*clip.shape[-2:])
    suffixes = [out.suffix] if out.suffix in (".gif", ".mp4") else [".gif", ".mp4"]
    stem = out.with_suffix("") if out.suffix in (".gif", ".mp4", ".pt") else out
    for ext in suffixes:
        write_video(clip, stem.with_name(stem.name + ext), fps=fps, scale=scale)
    if save_tensor:
        torch.save(video, stem.with_name(stem.name + ".pt"))


def _inspect(args: argparse.Namespace) -> None:
    from . import pretrained
    from .models import wan

    path = pretrained.resolve(args.path) if pretrained.is_name(args.path) else args.path
    print(wan.format_inspect(wan.inspect(path)))


def _convert(args: argparse.Namespace) -> None:
    from .generate import convert

    path = convert(args.path, args.out, base=args.base, use_ema=args.ema, preset=args.preset)
    print(f"framecast checkpoint: {path}")


def _quickstart(args: argparse.Namespace) -> None:
    from .quickstart import RECIPE, run

    scratch = ["use=", "name=quickstart_scratch"] if args.from_scratch else []  # its own runs: other inits
    run(RECIPE, [*scratch, *args.overrides], out_dir=args.out)


def _play(args: argparse.Namespace) -> None:
    from .play import serve

    size = (args.height, args.width) if args.height and args.width else None
    model = f"pretrained:{args.pretrained}" if args.pretrained else args.model
    serve(model, host=args.host, port=args.port, threads=args.threads, start=args.start, window=args.window,
          env=args.env, fps=args.fps, max_sessions=args.max_sessions, max_frames=args.max_frames, device=args.device,
          base=args.base, prompt=args.prompt, size=size, preset=args.preset, token=args.token,
          allow_origins=args.allow_origin)


def _bench(args: argparse.Namespace) -> None:
    from .bench import run

    run(out_dir=args.out, smoke=args.smoke, clips=args.clips, threads=args.threads, overrides=args.overrides)


def _add_train(sub) -> None:
    from .stages import STAGES

    t = sub.add_parser("train", help=f"train one stage ({', '.join(STAGES)}) from a YAML config plus key=value "
                       "overrides")
    t.add_argument("--config", default=None, help="YAML config (defaults if omitted)")
    t.add_argument("--allow-config-change", action="store_true", help="resume under changed settings")
    t.add_argument("overrides", nargs="*", help="strict overrides, e.g. stage=stage1 train.steps=100 model.preset=toy")
    t.set_defaults(fn=_train)
    o = sub.add_parser("pairs", help="generate (or finish) the ODE-pair store of an ode stage; resumable")
    o.add_argument("--config", default=None, help="YAML config (the ode stage's)")
    o.add_argument("overrides", nargs="*", help="e.g. ode.teacher=runs/toy/stage1 ode.num_pairs=512")
    o.set_defaults(fn=_pairs)
    r = sub.add_parser("pipeline", help="run a recipe's stages in order (stage0 -> stage1 -> ode|cd -> dmd)")
    r.add_argument("--recipe", required=True, help="recipe YAML (configs/toy_*.yaml)")
    r.add_argument("--out", type=FOLDER, default="runs", help="where runs are written")
    r.add_argument("--only", nargs="+", default=None,
                   help="train only these stages (the stages they start from must be finished)")
    r.add_argument("--allow-config-change", action="store_true", help="resume stages under changed settings")
    r.add_argument("overrides", nargs="*", help="overrides applied to every stage, e.g. train.threads=2")
    r.add_argument("--plan", action="store_true", help="print per-rank memory of every stage, build nothing")
    r.add_argument("--gpus", type=POS, nargs="+", default=[1, 8, 64], help="--plan: GPU counts to plan for")
    r.add_argument("--gpu-memory", type=S.arg_type(float, S.FINITE_POSITIVE), default=None, help="--plan: GiB per GPU")
    r.add_argument("--role", action="append", default=[], metavar="KEY=PRESET",
                   help="--plan: a role's model, e.g. dmd.real=wan2.1-14b (default: the stage's model)")
    r.set_defaults(fn=_pipeline)
    q = sub.add_parser("quickstart", help="the main job: the quickstart recipe on the toy, then a streamed sample + "
                       "report")
    q.add_argument("--out", type=FOLDER, default="runs", help="where runs are written")
    q.add_argument("--from-scratch", action="store_true", help="train Stage 0 too, instead of starting from the "
                   "shipped base pretrained:toy-base (minutes more, a much weaker base)")
    q.add_argument("overrides", nargs="*", help="overrides applied to every stage, e.g. train.threads=2")
    q.set_defaults(fn=_quickstart)


def _add_sample(sub) -> None:
    from .sampling import SAMPLERS

    s = sub.add_parser("sample", help="sample a video from a model (framecast checkpoint, Wan2.1 folder, CF/SF .pt)")
    s.add_argument("--model", "--ckpt", dest="model", required=True,
                   help="a framecast checkpoint (dir, ckpt/ root or run-stage dir; pretrained:<name> for a shipped "
                        "one), a Wan2.1 folder (diffusers or original layout) or an official Causal Forcing / Self "
                        "Forcing / CausVid model.pt")
    s.add_argument("--base", default=None, help="the Wan2.1 folder a model.pt (or converted checkpoint) builds on")
    s.add_argument("--preset", default=None, help="sampling preset of an official .pt (docs/wan.md)")
    s.add_argument("--negative-prompt", default=None, help="CFG's null prompt (default: the model's)")
    s.add_argument("--prompt", action="append", help="prompt (repeatable); default: the run's sample prompts")
    s.add_argument("--num", type=POS, default=1, help="videos per prompt")
    s.add_argument("--frames", type=NONNEG, default=0, help="frames of the output video (Wan: 1 + 4k; default: the "
                   "training clip length)")
    s.add_argument("--height", type=NONNEG, default=0, help="frame height in pixels (default: the model's)")
    s.add_argument("--width", type=NONNEG, default=0, help="frame width in pixels (default: the model's)")
    s.add_argument("--image", default=None, help="image-to-video: this first frame is encoded and kept as context")
    s.add_argument("--video", default=None, help="continuation: these frames are encoded and kept as context")
    s.add_argument("--steps", type=POS, default=None, help="Euler steps per block")
    s.add_argument("--guidance", type=FINITE, default=None, help="CFG scale")
    s.add_argument("--window", type=NONNEG, default=None, help="attention window in latent frames (rolling KV cache)")
    s.add_argument("--sink", type=NONNEG, default=None, help="first frames that stay in the window (sink)")
    s.add_argument("--sampler", choices=sorted(SAMPLERS), default=None,
                   help="override the checkpoint's sampler (refused for the wrong kind of model unless --force)")
    s.add_argument("--denoising-steps", type=int, nargs="+", default=None,
                   help="few-step list in the warped convention, e.g. 1000 500 (default: the checkpoint's)")
    s.add_argument("--force", action="store_true", help="sample with a sampler the model was not trained for")
    s.add_argument("--seed", type=SEED, default=0)
    s.add_argument("--device", type=DEVICE, default="cpu", help="cpu or cuda")
    s.add_argument("--threads", type=NONNEG, default=0,
                   help="torch threads (0: torch's default); use 1 when other jobs keep the cores busy, since "
                        "oversubscribed threads can slow small models by 10-100x")
    s.add_argument("--ema", action=argparse.BooleanOptionalAction, default=None, help="use EMA weights")
    s.add_argument("--out", default="sample", help="clip.mp4 / clip.gif, or a name without extension for both")
    s.add_argument("--save-tensor", action="store_true", help="also save the decoded frames as .pt")
    s.set_defaults(fn=_sample)
    i = sub.add_parser("inspect", help="what a path holds (format, components, parameters, dtype, sampling preset), "
                       "without loading weights")
    i.add_argument("path")
    i.set_defaults(fn=_inspect)
    c = sub.add_parser("convert", help="write a Wan2.1 folder, an official .pt or a framecast run (also one of "
                       "many processes: DCP) as one framecast checkpoint (safetensors)")
    c.add_argument("path")
    c.add_argument("--out", required=True, help="the new checkpoint's folder (must not exist)")
    c.add_argument("--base", default=None, help="the Wan2.1 folder a model.pt builds on")
    c.add_argument("--preset", default=None, help="sampling preset of an official checkpoint, e.g. framewise-2step")
    c.add_argument("--ema", action=argparse.BooleanOptionalAction, default=None,
                   help="official .pt: generator_ema (default when present) or generator")
    c.set_defaults(fn=_convert)


def _add_play(sub) -> None:
    y = sub.add_parser("play", help="serve a causal (world) model live: a page streams frames, held keys are actions")
    which = y.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", "--ckpt", dest="model",
                       help="a causal model: a framecast checkpoint (e.g. runs/minigrid/dmd_2step) or an official .pt")
    which.add_argument("--pretrained", metavar="NAME", help="a world model shipped with framecast, e.g. minigrid "
                       "(= --model pretrained:NAME, with its own start views)")
    y.add_argument("--base", default=None, help="the Wan2.1 folder an official .pt builds on")
    y.add_argument("--preset", default=None, help="sampling preset of an official .pt (default: from its file name)")
    y.add_argument("--prompt", default=None, help="text models: the prompt a session starts with (the page can "
                   "switch it)")
    y.add_argument("--height", type=NONNEG, default=0, help="text-to-video frame height in pixels")
    y.add_argument("--width", type=NONNEG, default=0, help="text-to-video frame width in pixels")
    y.add_argument("--start", default=None, help="recording whose first frames start sessions (default: the "
                   "checkpoint's training recording; none: the model draws the first frame)")
    y.add_argument("--host", default="127.0.0.1")
    y.add_argument("--allow-origin", action="append", default=[], metavar="ORIGIN",
                   help="also accept pages from scheme://host[:port] (repeatable; default: same origin only)")
    y.add_argument("--token", default=None, help="require ?token=... on the page, /info and the WebSocket")
    y.add_argument("--port", type=PORT, default=8000)
    y.add_argument("--fps", type=FPS, default=30.0, help="frame-rate cap (0: as fast as the model goes)")
    y.add_argument("--window", type=POS, default=None, help="KV-cache frames (default: the checkpoint's window, "
                   "else its training clip length)")
    y.add_argument("--env", default=None, help="action names and keys of this environment (default: from the "
                   "recording's manifest)")
    y.add_argument("--max-sessions", type=POS, default=2, help="concurrent players; the next one is refused")
    y.add_argument("--max-frames", type=NONNEG, default=0, help="frames per session before a reset is needed (0: none)")
    y.add_argument("--threads", type=NONNEG, default=0, help="torch threads (docs/world_model.md: 1 on 2 cores)")
    y.add_argument("--device", type=DEVICE, default="cpu", help="cpu or cuda")
    y.set_defaults(fn=_play)


def _add_bench(sub) -> None:
    from .bench import SUITES

    b = sub.add_parser("bench", help="train (or reuse) and evaluate every method of a benchmark; writes a table + gif")
    b.add_argument("suite", choices=sorted(SUITES), help="which benchmark (configs/bench_<suite>.yaml)")
    b.add_argument("--smoke", action="store_true", help="every stage a few steps: checks the path in minutes")
    b.add_argument("--out", type=FOLDER, default="runs", help="where runs are written")
    b.add_argument("--clips", type=POS, default=None, help="evaluation clips per method (default 128; smoke 8)")
    b.add_argument("--threads", type=NONNEG, default=0, help="torch threads for training and evaluation")
    b.add_argument("overrides", nargs="*", help="overrides applied to every stage")
    b.set_defaults(fn=_bench)


class UsageError(UserError):
    """A command line argparse refuses (a bad flag value, a missing argument): one line and exit 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's own prints the usage too: several lines
        raise UsageError(f"{message} (see {self.prog} --help)")


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="framecast", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="verb", required=True)
    for add in (_add_train, _add_sample, cli_data.add_record, cli_data.add_prepare, _add_play, _add_bench):
        add(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        p = parser()
        args, extra = p.parse_known_args(argv)
        # `framecast bench toy --smoke key=value`: argparse binds the positional overrides to the chunk right after
        # `toy`, so overrides given after options arrive here; any other stray argument is still an error
        if extra and args.verb == "bench" and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = [*args.overrides, *extra]
        elif extra:
            p.error(f"unrecognized arguments: {' '.join(extra)}")
        args.fn(args)
    except UserError as e:
        print(f"framecast: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
