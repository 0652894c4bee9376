"""One process per run folder (a training stage, a pair store): the run lock (architecture.md §5).

Two recipes that share a stage must not train it twice at once, and nothing in a run folder may be written
before its lock is held. The lock is `flock(2)` on `<folder>/.lock`, held for as long as the lock is: the
kernel grants it to one open file at a time, atomically, and drops it when its owner dies, so a lock left by
a killed process is free again with no takeover step to race. The file holds the owner's pid, only for the
message of a refused process; on release it is removed while still locked, and a process that opened the
removed file before that sees it is no longer the one at `<folder>/.lock` and opens again.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from pathlib import Path

from ..errors import UserError
from ..files import pid_alive

LOCK = ".lock"


class RunLockedError(UserError, RuntimeError):
    """Another live process holds this run folder (it trains the stage or writes the pair store)."""


def _owner(fd: int) -> int | None:
    """The pid the holder wrote, or None. The holder writes it just after taking the lock, so a refused
    process reading in between sees an empty file or a dead one's pid: it looks again for up to ~0.2 s."""
    for _ in range(20):
        with contextlib.suppress(OSError, ValueError):
            pid = int(os.pread(fd, 32, 0).decode().strip())
            if pid > 0 and pid_alive(pid):
                return pid
        time.sleep(0.01)
    return None


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _acquire(path: Path, doing: str) -> int:
    """An fd of `path` with the exclusive flock held, or RunLockedError naming the owner."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _owner(fd)
            os.close(fd)
            who = f"process {pid}" if pid is not None else "another process"
            raise RunLockedError(f"{path.parent} is being {doing} by {who}; wait for it (a re-run then reuses or "
                                 f"resumes its work) or stop it") from None
        except BaseException:
            os.close(fd)
            raise
        if _same_file(fd, path):
            return fd
        os.close(fd)  # its holder released it (and removed the file) after we opened it: open the new one


@contextlib.contextmanager
def run_lock(run_dir: str | Path, *, doing: str = "trained"):
    """Hold `run_dir`'s lock (creating the folder) for the block; RunLockedError if another process holds it.

    `doing` words the refusal: "<folder> is being <doing> by process <pid>". Not re-entrant: a second
    `run_lock` of the same folder, even in the same process, is refused.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK
    fd = _acquire(path, doing)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        try:
            if _same_file(fd, path):
                path.unlink()  # while still locked (see the module docstring)
        finally:
            os.close(fd)
