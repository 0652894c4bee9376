"""Sharded ODE-pair store (architecture.md §2; method.md §5.1, §12.4).

    <pairs>/manifest.json          how the pairs were made (teacher, kind, grid, anchors, CFG, sizes)
    <pairs>/shard_00000.safetensors states [n, A, F, C, H, W], endpoint, clean [n, F, C, H, W],
                                   text, null [n, L, Dt]; captions in the header metadata

Each shard is written under a temporary name and renamed when complete, so a killed generation leaves only
whole shards and a re-run continues with the first missing one. A store made with other settings is never
mixed in or overwritten: opening it with a different manifest is an error that names the differing key
(the reference's ODE and Self-Forcing stores differ in layout and must not be mixed, method.md §12.4).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..errors import ConfigError, DataError
from ..models.conditioning import Cond
from ..schema import differing_keys, read_json
from .batch import Batch

Tensor = torch.Tensor
MANIFEST = "manifest.json"
FIELDS = ("states", "endpoint", "clean", "text", "null")
ACTION_FIELDS = ("actions", "null_actions")  # [n, F] int64, world-model stores only (both or neither)


class PairStoreError(DataError):
    """A pair store that is corrupt or was made with other settings; the message names the problem."""


class PairStore:
    def __init__(self, root: str | Path, manifest: dict[str, Any]) -> None:
        """Open (or create) the store at `root` for pairs made as `manifest` says."""
        self.root = Path(root)
        self.manifest = json.loads(json.dumps(manifest))  # plain JSON types, comparable with the saved one
        n, size = int(manifest["num_pairs"]), int(manifest["shard_size"])
        if n < 1 or size < 1:
            raise ConfigError(f"ode.num_pairs and ode.shard_size must be >= 1, got {n}, {size}")
        self.num_shards = -(-n // size)
        path = self.root / MANIFEST
        if path.is_file():
            saved = read_json(path, "pair-store manifest", PairStoreError)
            diff = differing_keys(saved, self.manifest) if isinstance(saved, dict) else ["(not a JSON object)"]
            if diff:
                k = diff[0].split(".")[0]
                raise PairStoreError(f"pair store {self.root} was made with {k}={saved.get(k)!r}, not "
                                     f"{self.manifest.get(k)!r}; set ode.pairs_dir to another folder")
        else:
            self.root.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{MANIFEST}.tmp")
            tmp.write_text(json.dumps(self.manifest, indent=2))
            os.replace(tmp, path)

    def shard_path(self, i: int) -> Path:
        return self.root / f"shard_{i:05d}.safetensors"

    def shard_len(self, i: int) -> int:
        n, size = int(self.manifest["num_pairs"]), int(self.manifest["shard_size"])
        return min(size, n - i * size)

    def missing(self) -> list[int]:
        return [i for i in range(self.num_shards) if not self.shard_path(i).is_file()]

    def write(self, i: int, tensors: dict[str, Tensor], captions: list[str]) -> Path:
        if sorted(tensors) not in (sorted(FIELDS), sorted(FIELDS + ACTION_FIELDS)):
            raise ValueError(f"a shard holds {FIELDS} (+ {ACTION_FIELDS} for world models), got {sorted(tensors)}")
        n = self.shard_len(i)
        bad = {k: tuple(v.shape) for k, v in tensors.items() if v.shape[0] != n}
        if bad or len(captions) != n:
            raise ValueError(f"shard {i} must hold {n} pairs; got {bad or len(captions)} ")
        path = self.shard_path(i)
        if path.exists():
            raise PairStoreError(f"{path} already exists; refusing to overwrite it")
        tmp = path.with_name(f".{path.name}.tmp")
        save_file({k: v.detach().contiguous().cpu().to(torch.long if k in ACTION_FIELDS else torch.float32)
                   for k, v in tensors.items()}, str(tmp),
                  metadata={"captions": json.dumps(captions)})
        os.replace(tmp, path)
        return path

    def load(self) -> tuple[dict[str, Tensor], list[str]]:
        """All shards concatenated (toy scale: the whole store fits in memory)."""
        missing = self.missing()
        if missing:
            raise PairStoreError(f"pair store {self.root} lacks shards {missing[:5]}; run the ODE stage to finish it")
        parts: dict[str, list[Tensor]] = {k: [] for k in FIELDS + ACTION_FIELDS}
        captions: list[str] = []
        for i in range(self.num_shards):
            path = self.shard_path(i)
            try:
                with safe_open(str(path), framework="pt") as f:
                    for k in FIELDS + tuple(k for k in ACTION_FIELDS if k in f.keys()):
                        parts[k].append(f.get_tensor(k))
                    captions += json.loads((f.metadata() or {})["captions"])
            except (SafetensorError, OSError, KeyError, ValueError, TypeError) as e:
                raise PairStoreError(f"pair shard {path} is corrupt or truncated ({str(e).splitlines()[0]}); "
                                     f"delete it and re-run to regenerate it") from None
        return {k: torch.cat(v) for k, v in parts.items() if v}, captions


class PairSource:
    """Training batches drawn from a complete pair store: `video` is the clean ground truth, `extra` holds
    `states` and `endpoint`. Deterministic given the generator, like every source."""

    def __init__(self, store: PairStore) -> None:
        self.tensors, self.captions = store.load()
        self.size = len(self.captions)

    def batch(self, batch_size: int, generator: torch.Generator) -> Batch:
        idx = torch.randint(0, self.size, (batch_size,), generator=generator)
        t = {k: v[idx] for k, v in self.tensors.items()}
        return Batch(t["clean"], Cond(t["text"], t.get("actions")), Cond(t["null"], t.get("null_actions")),
                     [self.captions[i] for i in idx.tolist()],
                     {"states": t["states"], "endpoint": t["endpoint"]})
