"""One process per run folder (a training stage, a pair store): the run lock.

Two recipes that share a stage must not train it twice at once, and nothing in a run folder may be written
before its lock is held.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from ..errors import UserError


class RunLockedError(UserError, RuntimeError):
    """Another live process is training this run directory."""


def _lock_owner(path: Path) -> int | None:
    """The live process holding the lock file, or None when the file is stale (owner gone, unreadable)."""
    try:
        pid = int(path.read_text().strip())
    except (ValueError, FileNotFoundError):
        return None
    if pid <= 0:  # os.kill(0, ...) would signal our own process group
        return None
    try:
        os.kill(pid, 0)  # signal 0: existence check only
    except ProcessLookupError:
        return None
    except PermissionError:  # exists, owned by another user
        return pid
    return pid


@contextlib.contextmanager
def run_lock(run_dir: Path):
    """One training process per run directory: two recipes sharing a stage must not train it twice at once.

    The lock file holds the owner's pid; a lock left by a process that no longer exists is taken over.
    """
    path = Path(run_dir) / ".lock"
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            break
        except FileExistsError:
            pid = _lock_owner(path)
            if pid is not None:
                raise RunLockedError(f"{run_dir} is being trained by process {pid}; wait for it (a re-run then "
                                     f"reuses or resumes the stage) or stop it") from None
            path.unlink(missing_ok=True)  # stale: its owner has exited
    else:
        raise RuntimeError(f"could not take the lock {path}")
    try:
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        yield
    finally:
        path.unlink(missing_ok=True)
