"""The run lock (framecast/train/lock.py, architecture.md §5): one process per run folder, atomically.

Races are real processes started with multiprocessing's `fork` (cheap: no re-import), synchronised on
barriers so that both contenders try at the same moment and the winner holds the lock until the loser has
tried. `FRAMECAST_LOCK_TRIES` sets the number of contended tries (default 1000, about a second here).
"""

from __future__ import annotations

import fcntl
import multiprocessing
import os
import signal
import time
from pathlib import Path

import pytest

from framecast.train.lock import LOCK, RunLockedError, run_lock

CTX = multiprocessing.get_context("fork")
TRIES = int(os.environ.get("FRAMECAST_LOCK_TRIES", "1000"))
PAIRS = 4  # pairs of processes, each racing for its own folder


def _dead_pid() -> int:
    p = CTX.Process(target=lambda: None)
    p.start()
    p.join()
    return p.pid  # reaped: no process has it (until the kernel reuses it, which the lock does not care about)


def _contend(folder: Path, rounds: int, me: int, bars, stale: int, out) -> None:
    """One contender: each round, try the lock once with the other process; report what happened."""
    start, tried, released = bars
    seen = []
    for r in range(rounds):
        if me == 0 and r % 2:  # odd rounds start from a lock file left by a dead owner
            (folder / LOCK).write_text(str(stale))
        start.wait()
        try:
            with run_lock(folder):
                mine = (folder / LOCK).read_text() == str(os.getpid())
                tried.wait()  # hold it until the other process has tried
            seen.append("held" if mine else "held, but the file names another process")
        except RunLockedError as e:
            tried.wait()
            seen.append("refused" if str(folder) in str(e) and "process" in str(e) else f"bad message: {e}")
        released.wait()
    out.put((str(folder), me, seen))


def race(root: Path, tries: int, pairs: int = PAIRS) -> dict[str, int]:
    """`tries` contended tries by `pairs` pairs of processes; returns how many rounds ended which way."""
    out = CTX.Queue()
    procs, rounds = [], -(-tries // pairs)
    stale = _dead_pid()
    for i in range(pairs):
        folder = root / f"run{i}"
        folder.mkdir()
        bars = tuple(CTX.Barrier(2, timeout=30) for _ in range(3))
        procs += [CTX.Process(target=_contend, args=(folder, rounds, me, bars, stale, out)) for me in (0, 1)]
    for p in procs:
        p.start()
    reports = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    by: dict[str, list[list[str]]] = {}
    for folder, me, seen in reports:
        by.setdefault(folder, [None, None])[me] = seen
    counts: dict[str, int] = {}
    for a, b in by.values():
        for x, y in zip(a, b):
            outcome = "exactly one" if sorted((x, y)) == ["held", "refused"] else f"{x} / {y}"
            counts[outcome] = counts.get(outcome, 0) + 1
    return counts


def test_two_processes_racing_for_a_run_folder_exactly_one_proceeds(tmp_path, capsys):
    counts = race(tmp_path, TRIES)
    total = -(-TRIES // PAIRS) * PAIRS
    with capsys.disabled():
        print(f"\nrun lock: exactly one of two processes proceeded in {counts.get('exactly one', 0)}/{total} "
              f"contended tries")
    assert counts == {"exactly one": total}
    assert not list(tmp_path.glob(f"*/{LOCK}"))  # released: the lock file goes with the lock


def _hammer(folder: Path, times: int, holders, peak, start) -> None:
    """Take and release the lock over and over, counting the processes inside it at once. flock is slowed down
    (in this forked process only) to widen the gap between opening the lock file and locking it, where a
    release by the owner turns the opened file into a removed one: without the lock's same-file check this
    test sees two holders in nearly every run."""
    real = fcntl.flock
    fcntl.flock = lambda fd, op: (time.sleep(0.0003), real(fd, op))[1]
    start.wait()
    got = 0
    for _ in range(times):
        try:
            with run_lock(folder):
                with holders.get_lock():
                    holders.value += 1
                    peak.value = max(peak.value, holders.value)
                got += 1
                time.sleep(0.0002)  # held long enough for the others to open the file meanwhile
                with holders.get_lock():
                    holders.value -= 1
        except RunLockedError:
            pass
    os._exit(0 if got else 3)


def test_release_racing_with_new_owners_never_gives_two_holders(tmp_path):
    """Releases remove the lock file while others open it: a process that locked the removed file must not
    count as an owner next to the one that created the new file."""
    holders, peak = CTX.Value("i", 0), CTX.Value("i", 0)
    start = CTX.Barrier(4, timeout=30)
    procs = [CTX.Process(target=_hammer, args=(tmp_path, 400, holders, peak, start)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]  # each got the lock at least once
    assert peak.value == 1 and holders.value == 0


def _hold(folder: Path, ready, done) -> None:
    with run_lock(folder):
        ready.set()
        done.wait(60)


def test_a_killed_owners_lock_is_taken_over(tmp_path):
    ready, done = CTX.Event(), CTX.Event()
    owner = CTX.Process(target=_hold, args=(tmp_path, ready, done))
    owner.start()
    assert ready.wait(30)
    with pytest.raises(RunLockedError) as e:
        with run_lock(tmp_path):
            pytest.fail("took a lock another live process holds")
    msg = str(e.value)
    assert str(tmp_path) in msg and f"process {owner.pid}" in msg and "\n" not in msg
    os.kill(owner.pid, signal.SIGKILL)  # dies holding it: no release code runs
    owner.join(30)
    assert (tmp_path / LOCK).read_text() == str(owner.pid)  # its file stays behind ...
    with run_lock(tmp_path):  # ... and is free: the kernel dropped the lock with the process
        assert (tmp_path / LOCK).read_text() == str(os.getpid())
    assert not (tmp_path / LOCK).exists()


def test_a_lock_is_refused_within_one_process_too(tmp_path):
    with run_lock(tmp_path / "new" / "run"):  # creates the folder
        with pytest.raises(RunLockedError, match=f"being trained by process {os.getpid()}"):
            with run_lock(tmp_path / "new" / "run"):
                pass
    with run_lock(tmp_path / "new" / "run"):  # released on exit, also after an error inside
        pass


# ------------------------------------------------------------------------------------------------
# The pair store (stages.make_pairs)
# ------------------------------------------------------------------------------------------------


@pytest.fixture
def pairs_cfg(tmp_path, one_thread):
    from framecast import config as C
    from framecast.recipe import train_stage

    tiny = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
    base = [f"out_dir={tmp_path}", "train.progress=false", "train.steps=1"]
    teacher = train_stage(C.load(tiny, ["stage=stage1", *base]))
    return C.load(tiny, ["stage=ode", *base, f"ode.teacher={teacher}", "ode.num_pairs=2", "ode.shard_size=1",
                         "ode.grid_steps=8", "few_step.denoising_steps=[1000,500]",
                         f"ode.pairs_dir={tmp_path / 'pairs'}"])


def test_pair_generation_is_refused_while_another_process_fills_the_store(pairs_cfg, tmp_path):
    from framecast.stages import make_pairs

    store = tmp_path / "pairs"
    ready, done = CTX.Event(), CTX.Event()
    owner = CTX.Process(target=_hold, args=(store, ready, done))
    owner.start()
    try:
        assert ready.wait(30)
        with pytest.raises(RunLockedError) as e:
            make_pairs(pairs_cfg)
        assert str(store) in str(e.value) and f"process {owner.pid}" in str(e.value)
        assert "filled with ODE pairs" in str(e.value) and "already exists" not in str(e.value)
        assert sorted(p.name for p in store.iterdir()) == [LOCK]  # no manifest, no shard
    finally:
        done.set()
        owner.join(30)
    filled = make_pairs(pairs_cfg)  # once it is free the store is made
    assert filled.missing() == [] and not (store / LOCK).exists()


def _race_pairs(cfg, start, tried, out) -> None:
    from framecast.stages import make_pairs

    start.wait()
    try:
        store = make_pairs(cfg)
        out.put("made" if store.missing() == [] else f"incomplete: {store.missing()}")
    except RunLockedError as e:
        tried.wait()
        out.put("refused" if "filled with ODE pairs" in str(e) else f"bad message: {e}")
    except Exception as e:  # noqa: BLE001 (reported to the test, which fails on it)
        out.put(f"{type(e).__name__}: {e}")


def test_two_pair_generations_at_once_one_is_refused(pairs_cfg, tmp_path, monkeypatch):
    """Both start together; the winner writes only once the loser has tried, so the race is a real one."""
    from framecast.objectives import ode

    tried = CTX.Barrier(2, timeout=30)
    orig = ode.write_pairs

    def write_after_the_other_tried(*a, **kw):
        tried.wait()
        return orig(*a, **kw)

    monkeypatch.setattr(ode, "write_pairs", write_after_the_other_tried)  # inherited by the forked processes
    start, out = CTX.Barrier(2, timeout=30), CTX.Queue()
    procs = [CTX.Process(target=_race_pairs, args=(pairs_cfg, start, tried, out)) for _ in range(2)]
    for p in procs:
        p.start()
    results = sorted(out.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(30)
    assert results == ["made", "refused"]
    assert len(list((tmp_path / "pairs").glob("shard_*.safetensors"))) == 2
