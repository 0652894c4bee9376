"""`framecast prepare`: users' videos and captions, or a prompts file, -> a dataset store (data/store.py).

    framecast prepare --config configs/tiny.yaml --videos clips/ --captions captions.json --out data/clips
    framecast prepare --config my_wan.yaml data.num_frames=81 --prompts prompts.txt --out data/prompts

The codec and the text encoder are the run config's (model.codec, data.text_encoder ...), and so are the clip
size and length (data.height, data.width, data.num_frames); a run then trains on the store with
`data.name=store data.path=<out>`. Captions are a JSON object {relative path: caption}, a JSONL file of
{"path": ..., "caption": ...} rows, or a CSV file with path and caption columns. A video that cannot be
decoded, is too short or has no caption is skipped, printed, and listed in the manifest. A prompts file holds
one prompt per line (blank lines ignored) and makes a prompts-only store (DMD needs prompts, not videos).

Re-running with the same settings finishes a stopped run (no duplicates, the same shards); other settings
are refused. Under torchrun each rank writes its own shards (data/store.py).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..config import RunConfig
from ..errors import ConfigError, DataError
from ..models.codecs import Codec, build_codec, uint8_to_pixels
from ..models.conditioning import TextEncoder, build_text_encoder
from ..schema import POSITIVE, arg_type
from .shards import writer_lock
from .store import (
    DTYPES,
    MANIFEST,
    StoreWriter,
    dist_info,
    read_manifest,
    refuse_foreign,
)
from .video import VIDEO_SUFFIXES, VideoError, read_video

TEXT_CHUNK = 16  # prompts per text-encoder call: bounds umT5's activation memory


def _rel(path: str) -> str:
    """A caption file's path as the relative POSIX path videos are listed by."""
    p = Path(str(path).strip().replace("\\", "/"))
    return p.as_posix().removeprefix("./")


def _rows(path: Path) -> list[tuple[Any, Any, str]]:
    """(path, caption, where) rows of a captions file in any of the three formats."""
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json":
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError(f"a .json captions file must be an object {{path: caption}}, not {type(data).__name__}")
        return [(k, v, f"key {k!r}") for k, v in data.items()]
    if path.suffix.lower() == ".jsonl":
        out = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                row = json.loads(line)
                if not isinstance(row, dict) or not {"path", "caption"} <= set(row):
                    raise ValueError(f"line {n} is not an object with path and caption")
                out.append((row["path"], row["caption"], f"line {n}"))
        return out
    if path.suffix.lower() == ".csv":
        reader = csv.DictReader(text.splitlines())
        if not {"path", "caption"} <= set(reader.fieldnames or ()):
            raise ValueError(f"the header must name path and caption columns, got {reader.fieldnames}")
        return [(r["path"], r["caption"], f"line {n}") for n, r in enumerate(reader, 2)]
    raise ValueError("its suffix must be .json, .jsonl or .csv")


def read_captions(path: str | Path) -> dict[str, str]:
    """{relative video path: caption} from a .json, .jsonl or .csv file; a DataError naming the file."""
    path = Path(path)
    try:
        rows = _rows(path)
    except FileNotFoundError:
        raise DataError(f"captions file {path} is missing") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:  # json.JSONDecodeError is a ValueError
        raise DataError(f"captions file {path} is unreadable: {str(e).splitlines()[0]}") from None
    out: dict[str, str] = {}
    for p, caption, where in rows:
        if not isinstance(p, str) or not isinstance(caption, str):
            raise DataError(f"captions file {path}, {where}: path and caption must be strings")
        if _rel(p) in out:
            raise DataError(f"captions file {path}, {where}: {p!r} is captioned twice")
        out[_rel(p)] = caption
    return out


def list_videos(root: str | Path) -> list[str]:
    """Relative POSIX paths of the video files under `root`, sorted (hidden files and folders left out)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"videos folder {root} is missing or not a folder")
    found = [p.relative_to(root).as_posix() for p in root.rglob("*")
             if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES
             and not any(part.startswith(".") for part in p.relative_to(root).parts)]
    if not found:
        raise DataError(f"no video files ({', '.join(VIDEO_SUFFIXES)}) under {root}")
    return sorted(found)


def read_prompts(path: str | Path) -> list[str]:
    """One prompt per line, blank lines ignored; a DataError naming the file."""
    try:
        prompts = [ln.strip() for ln in Path(path).read_text(encoding="utf-8").splitlines() if ln.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"prompts file {path} is unreadable ({e.__class__.__name__}: {e})".splitlines()[0]) from None
    if not prompts:
        raise DataError(f"prompts file {path} holds no prompts")
    return prompts


def _inputs(videos: str | None, captions: str | None, prompts: str | None) -> tuple[dict, list]:
    """The store's source record and its inputs [(video path or None, caption or None)], in store order."""
    if prompts and not (videos or captions):
        return ({"kind": "prompts", "prompts": str(Path(prompts).resolve())},
                [(None, p) for p in read_prompts(prompts)])
    if videos and captions and not prompts:
        caps, found = read_captions(captions), list_videos(videos)
        if stray := sorted(set(caps) - set(found)):  # most often a typo in a path: that video is then skipped
            print(f"note: {len(stray)} captions in {captions} name no video under {videos}, e.g. {stray[0]!r}")
        return ({"kind": "videos", "videos": str(Path(videos).resolve()), "captions": str(Path(captions).resolve())},
                [(p, caps.get(p)) for p in found])
    raise ConfigError("give --videos DIR with --captions FILE (a video store), or --prompts FILE (a prompts-only "
                      "store), not both")


def _settings(cfg: RunConfig, codec: Codec, enc: TextEncoder, source: dict, items: list, dtype: str,
              shard_size: int, fps: int) -> dict[str, Any]:
    """The manifest's settings: what decides the store's contents (data/store.py)."""
    d = cfg.data
    try:
        frames = codec.latent_frames(d.num_frames)
    except ConfigError as e:
        raise ConfigError(f"data.num_frames={d.num_frames} does not suit codec {codec.name!r}: {e}") from None
    text = {"name": d.text_encoder, "source": d.text_encoder_source, "tokens": enc.max_tokens, "dim": enc.dim}
    if d.text_encoder == "hash":  # its vectors are seeded by data.seed
        text["seed"] = d.seed
    digest = hashlib.sha1(json.dumps(items).encode()).hexdigest()  # any change of files or captions shows
    return {"source": source, "inputs": {"count": len(items), "digest": digest},
            "codec": {"name": codec.name, "source": cfg.model.codec_source}, "text_encoder": text,
            "latent": {"shape": [frames, *codec.latent_shape((3, d.height, d.width))], "dtype": dtype},
            "pixels": {"height": d.height, "width": d.width, "frames": d.num_frames, "fps": fps},
            "shard_size": shard_size}


def _encode_text(enc: TextEncoder, prompts: list[str]) -> torch.Tensor:
    if not prompts:
        return torch.zeros(0, enc.max_tokens, enc.dim)
    return torch.cat([enc.encode(prompts[k:k + TEXT_CHUNK]).float().cpu()
                      for k in range(0, len(prompts), TEXT_CHUNK)])  # [n, L, D]


def _shard(w: StoreWriter, i: int, items: list, ctx: dict[str, Any], say: Callable[[str], None]):
    """Shard i's tensors and metadata: its inputs decoded, encoded, or skipped with the reason."""
    cfg, codec, dtype, shape = ctx["cfg"], ctx["codec"], DTYPES[ctx["dtype"]], w.settings["latent"]["shape"]
    latents, captions, paths, skipped = [], [], [], []
    for j in w.span(i):
        path, caption = items[j]
        if path is not None:
            try:
                if caption is None:
                    raise VideoError(path, f"no caption in {w.settings['source']['captions']}")
                frames = read_video(Path(ctx["videos"]) / path, cfg.data.num_frames, cfg.data.height,
                                    cfg.data.width, ctx["fps"])  # uint8 [F, 3, H, W]
            except VideoError as e:
                skipped.append({"path": path, "reason": e.why})
                say(f"skipped {path}: {e.why}")
                continue
            lat = codec.encode(uint8_to_pixels(frames)[None])[0]  # [F', C, h, w]
            if list(lat.shape) != shape:
                raise ValueError(f"codec {codec.name} gave latents {list(lat.shape)}, not {shape}")
            latents.append(lat.to(dtype))
            paths.append(path)
        captions.append(caption)
    tensors = {"text": _encode_text(ctx["text"], captions).to(dtype)}  # [n, L, D]
    if w.settings["source"]["kind"] == "videos":
        # [n, F', C, h, w]; a shard whose inputs were all skipped holds zero rows
        tensors["latents"] = torch.stack(latents) if latents else torch.zeros(0, *shape, dtype=dtype)
    return tensors, {"captions": captions, "paths": paths, "skipped": skipped}


def _finish(w: StoreWriter, rank: int) -> None:
    """Mark the store complete once every shard exists: rank 0 after a barrier under torch.distributed, else
    whichever process finds the last shard written (store.py)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        if rank == 0:
            w.finish()
        dist.barrier()
    else:
        w.finish()


def _open(cfg: RunConfig, videos, captions, prompts, out, dtype: str, shard_size: int, fps: int):
    """Everything that can refuse the request, before anything is written: (settings, inputs, context)."""
    if dtype not in DTYPES or shard_size < 1 or fps < 1:
        raise ConfigError(f"--dtype must be one of {sorted(DTYPES)} and --shard-size, --fps >= 1; got {dtype!r}, "
                          f"{shard_size}, {fps}")
    source, items = _inputs(videos, captions, prompts)
    device = cfg.train.device  # each torchrun rank encodes on its own GPU
    if device == "cuda" and "LOCAL_RANK" in os.environ:
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
    codec = build_codec(cfg.model.codec, cfg.model.in_channels, cfg.model.codec_source or None, device=device)
    enc = build_text_encoder(cfg.data.text_encoder, cfg.model.text_dim, cfg.data.text_tokens, cfg.data.seed,
                             source=cfg.data.text_encoder_source or None)
    settings = _settings(cfg, codec, enc, source, items, dtype, shard_size, fps)
    root = Path(out)
    if (root / MANIFEST).is_file():
        StoreWriter(root, settings)  # only reads: a store made otherwise is refused before the lock file is made
    refuse_foreign(root)
    ctx = {"cfg": cfg, "codec": codec, "text": enc, "dtype": dtype, "fps": fps, "videos": videos}
    return settings, items, ctx


def prepare(cfg: RunConfig, *, videos: str | None = None, captions: str | None = None, prompts: str | None = None,
            out: str | Path, dtype: str = "bf16", shard_size: int = 64, fps: int = 16, progress: bool = True,
            on_shard: Callable[[int], None] | None = None) -> Path:
    """Write (or finish) the store at `out` (module docstring) and return its path. `on_shard(i)` runs after
    shard i is written (tests stop a run there)."""
    from tqdm import tqdm

    settings, items, ctx = _open(cfg, videos, captions, prompts, out, dtype, shard_size, fps)
    root, (rank, world) = Path(out), dist_info()
    root.mkdir(parents=True, exist_ok=True)
    with writer_lock(root, f".lock.rank{rank}", "prepared"), torch.no_grad():
        w = StoreWriter(root, settings)  # a store made otherwise is refused here, before any write
        w.write_null(_encode_text(ctx["text"], [""])[0].to(DTYPES[dtype]))  # [L, D]
        mine = [i for i in range(w.num_shards) if i % world == rank]
        todo = [i for i in w.missing() if i % world == rank]
        bar = tqdm(total=sum(len(w.span(i)) for i in mine), disable=not progress or rank != 0,
                   initial=sum(len(w.span(i)) for i in mine if i not in todo), desc=f"prepare {root.name}",
                   unit="clip" if settings["source"]["kind"] == "videos" else "prompt")
        for i in todo:
            tensors, meta = _shard(w, i, items, ctx, bar.write)
            w.write_shard(i, tensors, meta)
            bar.update(len(w.span(i)))
            if on_shard is not None:
                on_shard(i)
        bar.close()
        _finish(w, rank)
    return root


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, help="the run config (codec, text encoder, data size and frames)")
    parser.add_argument("overrides", nargs="*", help="strict overrides, e.g. data.num_frames=81 data.height=480")
    parser.add_argument("--videos", default=None, help="folder of videos (mp4, webm, mov, mkv; searched recursively)")
    parser.add_argument("--captions", default=None, help=".json {path: caption}, .jsonl or .csv (path, caption)")
    parser.add_argument("--prompts", default=None, help="one prompt per line: a prompts-only store (for DMD)")
    parser.add_argument("--out", required=True, help="the store folder (a re-run with the same settings finishes it)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="latents and text embeddings")
    parser.add_argument("--shard-size", type=arg_type(int, POSITIVE), default=64, help="items per shard")
    parser.add_argument("--fps", type=arg_type(int, POSITIVE), default=16, help="frame rate videos are resampled to")


def run(args: argparse.Namespace) -> None:
    from ..config import load

    cfg = load(args.config, args.overrides)
    root = prepare(cfg, videos=args.videos, captions=args.captions, prompts=args.prompts, out=args.out,
                   dtype=args.dtype, shard_size=args.shard_size, fps=args.fps, progress=cfg.train.progress)
    m = read_manifest(root)
    if m.get("complete"):
        print(f"store: {root} ({m['items']} items in {len(m['shards'])} shards, {len(m['skipped'])} skipped)")
    else:
        print(f"store: {root} (this process's shards are written; other processes are still writing theirs)")
