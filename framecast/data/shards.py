"""Safetensors shards on disk, shared by the dataset store (data/store.py) and the ODE-pair store
(data/trajectories.py): durable atomic writes, a writer's lock, and memory-mapped reads of single rows.

Writes go to `.<name>.<host>.<pid>.tmp`, are fsynced, renamed into place and the folder fsynced, so a killed
writer leaves whole files or a stale temporary one (removed by the next writer of that file), never half a shard.
Reads open a file with `safe_open` (an mmap: only the rows asked for are read from disk) and keep the last
few handles open; a file that cannot be read is one error naming it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..errors import DataError, UserError
from ..rng import Draws, mix, randint
from ..files import fsync_dir, fsync_file, pid_alive

Tensor = torch.Tensor


def _tmp(path: Path) -> Path:
    # per host and process: two ranks never share one, and `remove_stale` can tell whose it is
    return path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")


def _publish(tmp: Path, path: Path) -> Path:
    fsync_file(tmp)
    os.replace(tmp, path)
    fsync_dir(path.parent)
    return path


def write_tensors(path: str | Path, tensors: dict[str, Tensor], meta: dict[str, Any]) -> Path:
    """Write a safetensors file atomically and durably; `meta` goes into the header as one JSON string.

    One metadata key only: safetensors writes several in hash order, which would make equal shards differ."""
    path = Path(path)
    tmp = _tmp(path)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp),
                  metadata={"framecast": json.dumps(meta, sort_keys=True)})
        return _publish(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path: str | Path, data: Any) -> Path:
    """Replace a JSON file atomically and durably."""
    path = Path(path)
    tmp = _tmp(path)
    try:
        with open(tmp, "w") as f:
            f.write(json.dumps(data, indent=2, sort_keys=True) + "\n")
        return _publish(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def remove_stale(path: Path) -> None:
    """Remove the temporary files of `path` that dead writers on this host left. A live writer's (another
    rank's) and other hosts' (a shared file system) are left alone: their owners rename or remove them."""
    host = socket.gethostname()
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        who, _, pid = tmp.name[len(path.name) + 2:-len(".tmp")].rpartition(".")
        if who == host and pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
            tmp.unlink(missing_ok=True)


def read_meta(handle, path: Path, error: type[UserError] = DataError) -> dict[str, Any]:
    """The JSON metadata `write_tensors` put in a shard's header."""
    try:
        meta = json.loads((handle.metadata() or {})["framecast"])
        if not isinstance(meta, dict):
            raise TypeError("not a JSON object")
        return meta
    except (KeyError, TypeError, ValueError) as e:
        raise error(f"shard {path} is corrupt: its header metadata is missing or unreadable "
                    f"({e.__class__.__name__}); delete it and re-run to write it again") from None


class Shards:
    """Open shard files by path (memory-mapped), keeping the `keep` most recently used handles open."""

    def __init__(self, keep: int = 8, error: type[UserError] = DataError) -> None:
        self.keep, self.error = keep, error
        self._open: OrderedDict[Path, Any] = OrderedDict()

    def handle(self, path: str | Path):
        path = Path(path)
        if path in self._open:
            self._open.move_to_end(path)
            return self._open[path]
        try:
            h = safe_open(str(path), framework="pt")
        except FileNotFoundError:
            raise self.error(f"shard {path} is missing; re-run the command that wrote the store") from None
        except (SafetensorError, OSError, ValueError) as e:
            raise self.error(f"shard {path} is corrupt (unreadable or truncated: {str(e).splitlines()[0]}); "
                             f"delete it and re-run to write it again") from None
        self._open[path] = h
        while len(self._open) > self.keep:
            self._open.popitem(last=False)  # dropping the handle closes its mmap
        return h

    def header(self, path: str | Path) -> dict[str, tuple[tuple[int, ...], str]]:
        """{key: (shape, safetensors dtype name)} of every tensor in the file: read from the header only."""
        h = self.handle(path)
        out = {}
        for k in h.keys():
            s = h.get_slice(k)
            out[k] = (tuple(s.get_shape()), s.get_dtype())
        return out

    def rows(self, where: list[tuple[Path, int]], key: str) -> Tensor:
        """Rows `where` = [(shard path, row)] of tensor `key`, stacked in that order: [len(where), ...]."""
        parts = []
        for path, row in where:
            try:
                parts.append(self.handle(path).get_slice(key)[row:row + 1])  # reads this row only
            except (SafetensorError, OSError, ValueError) as e:
                raise self.error(f"shard {path}: cannot read row {row} of {key!r} ({str(e).splitlines()[0]})") from None
        return torch.cat(parts)


@contextlib.contextmanager
def writer_lock(root: Path, name: str, doing: str):
    """Hold `root/<name>` (an flock) for the block, or refuse: one writer per store (per rank under torchrun).

    The lock file stays (removing it would race a process that just opened it); the kernel frees the lock
    when its holder dies, so a killed run never blocks the next one."""
    fd = os.open(root / name, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise DataError(f"{root} is being {doing} by another process; wait for it (a re-run then continues its "
                        f"work) or stop it") from None
    try:
        yield
    finally:
        os.close(fd)


class EpochOrder:
    """Which item each sample of a run reads (the store and pair readers): with the trainer's `Draws`, global
    sample position p reads item perm_e[p % N] of epoch e = p // N, perm_e a permutation of the N items seeded by
    mix(seed, e), so every epoch visits every item once and a step's data follows from its number alone, however
    the batch is split over ranks and micro-batches. With a plain torch.Generator: uniform draws from it."""

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.seed = size, seed
        self._perms: dict[int, Tensor] = {}

    def _perm(self, epoch: int) -> Tensor:
        if epoch not in self._perms:
            if len(self._perms) >= 2:  # batches straddle at most two epochs
                self._perms.pop(min(self._perms))
            g = torch.Generator().manual_seed(mix(self.seed, epoch))
            self._perms[epoch] = torch.randperm(self.size, generator=g)
        return self._perms[epoch]

    def indices(self, batch_size: int, generator: torch.Generator | Draws) -> list[int]:
        if not isinstance(generator, Draws):
            return randint(0, self.size, (batch_size,), generator).tolist()
        if len(generator.positions) != batch_size:
            raise ValueError(f"{len(generator.positions)} sample positions for a batch of {batch_size}")
        return [int(self._perm(p // self.size)[p % self.size]) for p in generator.positions]
