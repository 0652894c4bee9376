"""Sharded ODE-pair store (architecture.md §2; method.md §5.1, §12.4).

    <pairs>/manifest.json          how the pairs were made (teacher, kind, grid, anchors, CFG, sizes)
    <pairs>/shard_00000.safetensors states [n, A, F, C, H, W], endpoint, clean [n, F, C, H, W],
                                   text, null [n, L, Dt]; captions in the header metadata

Each shard is written under a temporary name, fsynced and renamed when complete, so a killed generation leaves only
whole shards and a re-run continues with the first missing one. A store made with other settings is never
mixed in or overwritten: opening it with a different manifest is an error that names the differing key
(the reference's ODE and Self-Forcing stores differ in layout and must not be mixed, method.md §12.4).
`PairSource` checks every shard's header once and then reads only the rows of each batch from the
memory-mapped shards (data/shards.py), so a store larger than memory trains as well as a toy one.
"""

from __future__ import annotations

import bisect
import itertools
import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..errors import ConfigError, DataError
from ..files import fsync_dir, fsync_file
from ..models.conditioning import Cond
from ..rng import Draws
from ..schema import differing_keys, read_json
from .batch import Batch
from .shards import EpochOrder, Shards

Tensor = torch.Tensor
MANIFEST = "manifest.json"
TIMING = "timing.json"  # shard -> seconds it took to generate (objectives/ode.py writes it, bench reads it)
FIELDS = ("states", "endpoint", "clean", "text", "null")
ACTION_FIELDS = ("actions", "null_actions")  # [n, F] int64, world-model stores only (both or neither)
_DTYPES = {"F32": torch.float32, "I64": torch.long}  # safetensors dtype names of the stored fields


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
            if not isinstance(saved, dict):
                raise PairStoreError(f"pair-store manifest {path} is not a JSON object (got {type(saved).__name__}); "
                                     f"set ode.pairs_dir to another folder")
            diff = differing_keys(saved, self.manifest)
            if diff:
                k = diff[0].split(".")[0]
                raise PairStoreError(f"pair store {self.root} was made with {k}={saved.get(k)!r}, not "
                                     f"{self.manifest.get(k)!r}; set ode.pairs_dir to another folder")
        else:
            self.root.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{MANIFEST}.tmp")
            tmp.write_text(json.dumps(self.manifest, indent=2))
            os.replace(tmp, path)
        read_timing(self.root)  # an unreadable timing file is refused before any pair is generated

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
        fsync_file(tmp)  # durable before it is named: a crash leaves a whole shard or none
        os.replace(tmp, path)
        fsync_dir(path.parent)
        return path

    def _read(self, i: int) -> tuple[dict[str, Tensor], list[str]]:
        """Shard i's tensors and captions; a PairStoreError naming the file if it cannot be read."""
        path = self.shard_path(i)
        try:
            with safe_open(str(path), framework="pt") as f:
                t = {k: f.get_tensor(k) for k in FIELDS + tuple(k for k in ACTION_FIELDS if k in f.keys())}
        except (SafetensorError, OSError, KeyError, ValueError, TypeError) as e:
            raise self._corrupt(path, f"unreadable or truncated: {str(e).splitlines()[0]}") from None
        return t, self.header(i)[1]

    def header(self, i: int) -> tuple[dict[str, tuple[tuple[int, ...], torch.dtype]], list[str]]:
        """Shard i's layout {field: (shape, dtype)} and captions, from its header alone (no tensor is read)."""
        path = self.shard_path(i)
        try:
            with safe_open(str(path), framework="pt") as f:
                if missing := [k for k in FIELDS if k not in f.keys()]:
                    raise ValueError(f"it lacks {missing}")
                slices = {k: f.get_slice(k) for k in FIELDS + tuple(k for k in ACTION_FIELDS if k in f.keys())}
                layout = {k: (tuple(v.get_shape()), _DTYPES.get(v.get_dtype(), v.get_dtype()))
                          for k, v in slices.items()}
                captions = json.loads((f.metadata() or {})["captions"])
        except (SafetensorError, OSError, KeyError, ValueError, TypeError) as e:
            raise self._corrupt(path, f"unreadable or truncated: {str(e).splitlines()[0]}") from None
        return layout, captions

    def _corrupt(self, path: Path, why: str) -> PairStoreError:
        return PairStoreError(f"pair shard {path} is corrupt ({why}); delete it and re-run to regenerate it")

    def _problem(self, i: int, t: dict[str, tuple[tuple[int, ...], Any]], captions: Any) -> str | None:
        """What is wrong with shard i's layout {field: (shape, dtype)} and captions, or None."""
        n, clean, text = self.shard_len(i), t["clean"][0], t["text"][0]
        anchors = self.manifest.get("anchors")
        A = len(anchors) if isinstance(anchors, list) else (t["states"][0][1] if len(t["states"][0]) > 1 else 0)
        want = {"clean": (n, *clean[1:]), "endpoint": clean, "states": (n, A, *clean[1:]), "text": (n, *text[1:]),
                "null": text}
        if len(clean) != 5 or len(text) != 3:
            return f"clean is {list(clean)} and text {list(text)}, not [n, F, C, H, W] and [n, L, D]"
        if (acts := [k for k in ACTION_FIELDS if k in t]) and len(acts) == 1:
            return f"it holds {acts[0]} without {[k for k in ACTION_FIELDS if k not in t][0]}"
        if acts and len(t["actions"][0]) != 2:
            return f"actions is {list(t['actions'][0])}, not [n, F]"
        want.update({k: (n, *t["actions"][0][1:]) for k in acts})
        for k, shape in want.items():
            if t[k][0] != shape:
                return f"{k} is {list(t[k][0])}, not {list(shape)}"
            if t[k][1] != (torch.long if k in ACTION_FIELDS else torch.float32):
                return f"{k} is {t[k][1]}"
        if not isinstance(captions, list) or len(captions) != n or not all(isinstance(c, str) for c in captions):
            return f"its captions are not {n} strings"
        return None

    def check(self) -> list[list[str]]:
        """Every shard's captions after checking its header: present, readable, of the shapes its manifest and
        the first shard give. A damaged shard is a PairStoreError naming the file; no tensor is read."""
        missing = self.missing()
        if missing:
            raise PairStoreError(f"pair store {self.root} lacks shards {missing[:5]}; run the ODE stage to finish it")
        first: dict[str, tuple[int, ...]] = {}
        out = []
        for i in range(self.num_shards):
            layout, captions = self.header(i)
            problem = self._problem(i, layout, captions)
            shapes = {k: shape[1:] for k, (shape, _) in layout.items()}
            if problem is None and first and shapes != first:
                problem = f"its tensors are {shapes}, but shard 0 holds {first}"
            if problem:
                raise self._corrupt(self.shard_path(i), problem)
            first = first or shapes
            out.append(captions)
        return out

    def shards(self):
        """Every shard's (tensors, captions), each checked: its header (see `check`), then finite values."""
        for i, captions in enumerate(self.check()):
            t, _ = self._read(i)
            bad = next((k for k, v in t.items() if k not in ACTION_FIELDS and not bool(torch.isfinite(v).all())), None)
            if bad:
                raise self._corrupt(self.shard_path(i), f"{bad} holds NaN or infinite values")
            yield t, captions

    def verify(self) -> None:
        """Check every shard (see `shards`) without keeping them."""
        for _ in self.shards():
            pass

    def load(self) -> tuple[dict[str, Tensor], list[str]]:
        """All shards concatenated (toy scale: the whole store fits in memory)."""
        parts: dict[str, list[Tensor]] = {k: [] for k in FIELDS + ACTION_FIELDS}
        captions: list[str] = []
        for t, c in self.shards():
            for k, v in t.items():
                parts[k].append(v)
            captions += c
        return {k: torch.cat(v) for k, v in parts.items() if v}, captions


def read_timing(root: str | Path) -> dict[str, float]:
    """A store's timing (shard -> seconds it took): timing.json merged with the per-rank files of a torchrun
    generation; {} if there is none; a PairStoreError naming a file that cannot be read."""
    root = Path(root)
    times: dict[str, float] = {}
    for path in [root / TIMING, *sorted(root.glob("timing.rank*.json"))]:
        times.update(read_json_timing(path))
    return times


def read_json_timing(path: Path) -> dict[str, float]:
    """One timing file, {} if it does not exist."""
    if not path.exists():
        return {}
    times = read_json(path, "pair-store timing file", PairStoreError)
    ok = isinstance(times, dict) and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                                         and v >= 0 for v in times.values())
    if not ok:
        raise PairStoreError(f"pair-store timing file {path} is not a mapping of shard -> seconds; delete it (the "
                             f"cost is then estimated from the shards' times)")
    return times


class PairSource:
    """Training batches drawn from a complete pair store: `video` is the clean ground truth, `extra` holds
    `states` and `endpoint`. Under the trainer (`framecast.rng.Draws`) samples follow a seeded per-epoch order of
    the pairs (data/shards.py `EpochOrder`); with a plain torch.Generator, uniform draws. Every row is checked
    finite once at the start; each batch then reads only its rows from the memory-mapped shards."""

    def __init__(self, store: PairStore) -> None:
        self.store = store
        per_shard = store.check()
        self.captions = [c for caps in per_shard for c in caps]
        self.size = len(self.captions)
        self.starts = [0, *itertools.accumulate(len(c) for c in per_shard)][:-1]  # first pair of each shard
        self.fields = list(FIELDS) + [k for k in ACTION_FIELDS if k in store.header(0)[0]]
        self.shards = Shards(keep=8, error=PairStoreError)
        self.order = EpochOrder(self.size, int(store.manifest.get("seed", 0)))
        self._scan()

    def _scan(self) -> None:
        """Every row checked finite once, one row in memory at a time, before a run writes anything: a damaged
        store is refused up front (tests/test_bad_input.py), not steps into training."""
        for j in range(self.size):
            path, row = self._where(j)
            for k in self.fields:
                if k not in ACTION_FIELDS and not bool(torch.isfinite(self.shards.rows([(path, row)], k)).all()):
                    raise self.store._corrupt(path, f"{k} holds NaN or infinite values in row {row}")

    def _where(self, j: int) -> tuple[Path, int]:
        i = bisect.bisect_right(self.starts, j) - 1
        return self.store.shard_path(i), j - self.starts[i]

    def batch(self, batch_size: int, generator: torch.Generator | Draws) -> Batch:
        idx = self.order.indices(batch_size, generator)  # an epoch order under the trainer (data/shards.py)
        where = [self._where(j) for j in idx]
        t = {k: self.shards.rows(where, k) for k in self.fields}  # [B, ...] each, in batch order; scanned finite
        return Batch(t["clean"], Cond(t["text"], t.get("actions")), Cond(t["null"], t.get("null_actions")),
                     [self.captions[j] for j in idx], {"states": t["states"], "endpoint": t["endpoint"]})
