"""The dataset store `framecast prepare` writes (data/prepare.py) and `StoreSource`, its streaming reader.

    <store>/manifest.json            format + version; the settings it was made with (source, inputs, codec, text
                                     encoder, latent shape and dtype, pixel size / frames / fps, shard size);
                                     once every shard exists: complete, items, per-shard counts, skipped inputs
    <store>/null.safetensors         null [L, D]: the empty prompt's embedding (CFG dropout needs no text encoder)
    <store>/shard_00000.safetensors  latents [n, F, C, h, w] (absent in a prompts-only store), text [n, L, D],
                                     both bf16 or fp16; header metadata (JSON): the inputs [start, end) it
                                     covers, their paths and captions, and those of them that were skipped

Inputs are in a fixed order (sorted relative paths of videos, file order of prompts) and shard i covers inputs
[i * shard_size, (i + 1) * shard_size), whether or not some of them are skipped (an unreadable video, one
without a caption): a re-run computes the same shards, continues with the missing ones and writes no
duplicates. A store made with other settings is refused, naming the first differing key, before anything
is written. Under torchrun rank r writes the shards i with i % world_size == r; whichever process finds
every shard present marks the manifest complete.
"""

from __future__ import annotations

import bisect
import itertools
import os
from pathlib import Path
from typing import Any

import torch

from ..config import DataConfig
from ..errors import ConfigError, DataError, UserError
from ..models.codecs import Codec
from ..models.conditioning import Cond, TextEncoder
from ..rng import Draws
from ..schema import differing_keys, read_json
from .batch import Batch
from .shards import EpochOrder, Shards, read_meta, remove_stale, write_json, write_tensors

Tensor = torch.Tensor
FORMAT, VERSION = "framecast-store", 1
MANIFEST, NULL = "manifest.json", "null.safetensors"
STATE = ("complete", "items", "shards", "skipped")  # what a run records; every other manifest key is a setting
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
ST_DTYPES = {"bf16": "BF16", "fp16": "F16"}  # safetensors' names of the same


class StoreError(DataError):
    """A store that is missing, corrupt, incomplete or made with other settings; the message names the file."""


def _at(d: dict[str, Any], dotted: str) -> Any:
    for k in dotted.split("."):
        d = d.get(k) if isinstance(d, dict) else None
    return d


def read_manifest(root: str | Path) -> dict[str, Any]:
    """A store's manifest, checked to be a framecast store of this version; a StoreError naming the file."""
    path = Path(root) / MANIFEST
    m = read_json(path, "store manifest", StoreError)
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise StoreError(f"{path} is not a framecast store manifest (format {_at(m, 'format')!r} if any); "
                         f"write one with framecast prepare")
    if m.get("version") != VERSION:
        raise StoreError(f"store {path} has version {m.get('version')!r}; this framecast reads version {VERSION}")
    return m


def refuse_foreign(root: Path) -> None:
    """A StoreError unless `root` is absent, an empty folder or a store: a store is never written over other files."""
    if root.exists() and not (root / MANIFEST).is_file() and (
            not root.is_dir() or any(not p.name.startswith(".") for p in root.iterdir())):
        raise StoreError(f"{root} is not empty and holds no {MANIFEST}; refusing to write a store into it: "
                             f"choose an empty or new --out folder")


class StoreWriter:
    """The writing side of a store at `root` made with `settings` (opened or created; other settings refused)."""

    def __init__(self, root: str | Path, settings: dict[str, Any]) -> None:
        self.root = Path(root)
        self.settings = {"format": FORMAT, "version": VERSION, **settings}
        n, size = int(settings["inputs"]["count"]), int(settings["shard_size"])
        self.num_inputs, self.shard_size, self.num_shards = n, size, -(-n // size)
        if (self.root / MANIFEST).is_file():
            saved = read_manifest(self.root)
            diff = differing_keys({k: v for k, v in saved.items() if k not in STATE}, self.settings)
            if diff:
                k = diff[0]
                raise StoreError(f"store {self.root} was made with {k}={_at(saved, k)!r}, not "
                                 f"{_at(self.settings, k)!r}; write to another --out folder (or delete this one)")
        else:
            refuse_foreign(self.root)
            self.root.mkdir(parents=True, exist_ok=True)
            remove_stale(self.root / MANIFEST)
            write_json(self.root / MANIFEST, {**self.settings, "complete": False, "items": None, "shards": None,
                                              "skipped": []})

    def shard_path(self, i: int) -> Path:
        return self.root / f"shard_{i:05d}.safetensors"

    def span(self, i: int) -> range:
        """The input indices shard i covers."""
        return range(i * self.shard_size, min(self.num_inputs, (i + 1) * self.shard_size))

    def missing(self) -> list[int]:
        return [i for i in range(self.num_shards) if not self.shard_path(i).is_file()]

    def write_shard(self, i: int, tensors: dict[str, Tensor], meta: dict[str, Any]) -> Path:
        path = self.shard_path(i)
        remove_stale(path)
        return write_tensors(path, tensors, {"inputs": [self.span(i).start, self.span(i).stop], **meta})

    def write_null(self, null: Tensor) -> None:
        """The empty prompt's embedding [L, D]; every rank computes the same one, so any may write it."""
        if not (self.root / NULL).is_file():
            write_tensors(self.root / NULL, {"null": null}, {"prompt": ""})

    def finish(self) -> dict[str, Any] | None:
        """Mark the store complete if every shard exists (counts and skipped inputs from the shard headers);
        returns the manifest then, else None."""
        if self.missing() or not (self.root / NULL).is_file():
            return None
        shards, counts, skipped = Shards(keep=1, error=StoreError), [], []
        for i in range(self.num_shards):
            path = self.shard_path(i)
            meta = read_meta(shards.handle(path), path, StoreError)
            counts.append(len(meta.get("captions", [])))
            skipped += meta.get("skipped", [])
        manifest = {**self.settings, "complete": True, "items": sum(counts), "shards": counts, "skipped": skipped}
        if read_manifest(self.root) != manifest:  # a finished store stays byte-for-byte as it is
            write_json(self.root / MANIFEST, manifest)
        return manifest


# ------------------------------------------------------------------------------------------------
# Reading: the training source
# ------------------------------------------------------------------------------------------------


def check_run(m: dict[str, Any], cfg: DataConfig, text_encoder: TextEncoder, codec: Codec) -> None:
    """The store `m` (at cfg.path) fits this run's codec, latent shape and text encoder, or one ConfigError
    naming the key, the store's value and the run's."""
    t = m["text_encoder"]
    run = [("codec.name", m["codec"]["name"], codec.name, "model.codec"),
           ("latent.shape", m["latent"]["shape"],
            [codec.latent_frames(cfg.num_frames), *codec.latent_shape((3, cfg.height, cfg.width))],
            "data.num_frames, data.height and data.width"),
           ("text_encoder.name", t["name"], cfg.text_encoder, "data.text_encoder"),
           ("text_encoder.tokens", t["tokens"], text_encoder.max_tokens, "data.text_tokens"),
           ("text_encoder.dim", t["dim"], text_encoder.dim, "model.text_dim")]
    if "seed" in t:  # the hash encoder's vectors depend on data.seed
        run.append(("text_encoder.seed", t["seed"], cfg.seed, "data.seed"))
    for key, stored, ours, keys in run:
        if stored != ours:
            raise ConfigError(f"store {cfg.path} was made with {key}={stored!r} but this run ({keys}) has {ours!r}; "
                              f"set them to match the store, or re-run framecast prepare with this run's config")


class StoreSource:
    """Training batches streamed from a complete store (`data.name=store`, `data.path=<store>`).

    `batch(batch_size, generator)`: with a `framecast.rng.Draws` (the trainer's per-sample generators),
    global sample position p reads item perm_e[p % N] of epoch e = p // N, perm_e a permutation of the N
    items seeded by mix(data.seed, e): every epoch visits every item once and the data of a step follows from
    its number alone, however the batch is split over ranks and micro-batches (so resume is exact). With a
    plain torch.Generator: uniform indices drawn from it.

    video: float32 latents [B, F, C, h, w]. A prompts-only store has no latents and gives zeros of the
    store's latent shape: DMD only needs the prompts and the shapes. cond: the prompts' float32 embeddings;
    null: the empty prompt's, one copy per row. Shards are memory-mapped and only the rows of the batch read.
    """

    def __init__(self, cfg: DataConfig, text_encoder: TextEncoder, codec: Codec) -> None:
        if not cfg.path:
            raise ConfigError("data.name=store needs data.path (a folder written by framecast prepare)")
        self.root, self.seed, self.text_encoder = Path(cfg.path), cfg.seed, text_encoder
        m = read_manifest(self.root)
        if not m.get("complete"):
            raise StoreError(f"store {self.root} is incomplete (a framecast prepare was stopped or is running); "
                             f"re-run it with the same settings to finish it")
        try:
            check_run(m, cfg, text_encoder, codec)
            self.shape = tuple(int(s) for s in m["latent"]["shape"])
            self.has_latents, counts = m["source"]["kind"] == "videos", [int(n) for n in m["shards"]]
            ST_DTYPES[m["latent"]["dtype"]]
        except UserError:  # a ConfigError is also a ValueError: a mismatch stays a mismatch
            raise
        except (KeyError, TypeError, ValueError) as e:
            raise StoreError(f"store manifest {self.root / MANIFEST} is corrupt ({e.__class__.__name__}: {e}); "
                             f"re-run framecast prepare into a new folder") from None
        self.manifest, self.shards = m, Shards(keep=8, error=StoreError)
        self.starts = [0, *itertools.accumulate(counts)][:-1]  # first item of each shard
        self.size = sum(counts)
        if self.size == 0:
            raise StoreError(f"store {self.root} holds no items (every input was skipped: see its manifest)")
        self.captions: list[str] = []
        for i, n in enumerate(counts):
            self.captions += self._check_shard(i, n)
        self.null = self._read_null()  # [L, D] float32
        self.order = EpochOrder(self.size, self.seed)

    def __len__(self) -> int:
        return self.size

    def _path(self, i: int) -> Path:
        return self.root / f"shard_{i:05d}.safetensors"

    def _check_shard(self, i: int, n: int) -> list[str]:
        """Shard i's captions, after checking its header: the tensors, shapes and dtype the manifest says."""
        m, path = self.manifest, self._path(i)
        t = m["text_encoder"]
        want = {"text": ((n, t["tokens"], t["dim"]), ST_DTYPES[m["latent"]["dtype"]])}
        if self.has_latents:
            want["latents"] = ((n, *self.shape), ST_DTYPES[m["latent"]["dtype"]])
        got = self.shards.header(path)
        meta = read_meta(self.shards.handle(path), path, StoreError)
        captions = meta.get("captions")
        if set(got) != set(want):
            problem = f"it holds {sorted(got)}, not {sorted(want)}"
        else:
            problem = next((f"{k} is {list(got[k][0])} {got[k][1]}, not {list(s)} {d}" for k, (s, d) in want.items()
                            if got[k] != (s, d)), None)
        if not problem and not (isinstance(captions, list) and len(captions) == n
                                and all(isinstance(c, str) for c in captions)):
            problem = f"its metadata does not list {n} captions"
        if problem:
            raise StoreError(f"shard {path} is corrupt ({problem}); delete it and re-run framecast prepare")
        return captions

    def _read_null(self) -> Tensor:
        path = self.root / NULL
        t = self.shards.header(path)
        want = (self.manifest["text_encoder"]["tokens"], self.manifest["text_encoder"]["dim"])
        if "null" not in t or t["null"][0] != want:
            raise StoreError(f"{path} is corrupt: it must hold null {list(want)}; delete it and re-run framecast "
                             f"prepare")
        return self.shards.handle(path).get_tensor("null").float()  # [L, D]

    def indices(self, batch_size: int, generator: torch.Generator | Draws) -> list[int]:
        """The items of a batch (see the class docstring)."""
        return self.order.indices(batch_size, generator)

    def _where(self, j: int) -> tuple[Path, int]:
        i = bisect.bisect_right(self.starts, j) - 1  # empty shards share a start; the last of them holds j
        return self._path(i), j - self.starts[i]

    def batch(self, batch_size: int, generator: torch.Generator | Draws) -> Batch:
        idx = self.indices(batch_size, generator)
        where = [self._where(j) for j in idx]
        text = self.shards.rows(where, "text").float()  # [B, L, D]
        if self.has_latents:
            video = self.shards.rows(where, "latents").float()  # [B, F, C, h, w]
        else:
            video = torch.zeros(batch_size, *self.shape)  # [B, F, C, h, w]: a prompts-only store
        null = Cond(self.null.expand(batch_size, *self.null.shape).clone())  # [B, L, D], own storage
        return Batch(video, Cond(text), null, [self.captions[j] for j in idx])

    def encode_prompts(self, prompts: list[str]) -> tuple[Cond, Cond]:
        """Prompts of periodic samples through the run's text encoder, as the other prompted sources do."""
        return Cond(self.text_encoder.encode(prompts)), Cond(self.text_encoder.encode([""] * len(prompts)))


def dist_info() -> tuple[int, int]:
    """(rank, world size): torch.distributed's when it is initialised, else torchrun's RANK / WORLD_SIZE."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
