"""File-system primitives every durable writer shares: fsync of a file or a folder, and whether a pid lives.

Checkpoints (train/checkpoint.py), run locks (train/lock.py) and the data stores (data/shards.py) build their
atomic writes on these: write a temporary file, fsync it, rename it into place, fsync the folder.
"""

from __future__ import annotations

import os
from pathlib import Path


def fsync_file(path: str | Path) -> int:
    """Flush a written file to disk; returns its size."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        return os.fstat(fd).st_size
    finally:
        os.close(fd)


def fsync_dir(path: str | Path) -> None:
    """Flush a folder's entries (a file created or renamed in it) to disk; POSIX only."""
    if os.name == "nt":
        return
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists on this host."""
    try:
        os.kill(pid, 0)  # signal 0: an existence check only
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True
