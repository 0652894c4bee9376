"""Helpers of tests/test_kill_resume.py: `framecast train` in a subprocess that is SIGKILLed at a named point of a
checkpoint save (FRAMECAST_FAULT, train/checkpoint.py) or after a random delay, and what such a run leaves.

A kill is real: the child is `python -m framecast.cli train ...`, killed by SIGKILL (its own os.kill at a fault
point, or ours), so no `finally`, atexit or flush runs. Children use one thread, like the in-process re-runs, so
every run of a config computes the same bits.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from framecast.train import checkpoint as ckpt

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
STEPS, EVERY = 6, 2  # checkpoints at 2, 4 and 6: the nth save of a fault `<point>:<nth>` writes step 2 * nth
COMMON = [f"train.steps={STEPS}", f"train.ckpt_every={EVERY}", "train.progress=false", "train.threads=1"]
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def argv(out: Path, stage_args: list[str], *extra: str) -> list[str]:
    """The `framecast` command line (after `python -m framecast.cli`) of a run of `stage_args` in `out`."""
    return ["train", "--config", str(TINY), *stage_args, *COMMON, f"out_dir={out}", *extra]


def run_dir(out: Path, stage_args: list[str]) -> Path:
    stage = next(a.split("=", 1)[1] for a in stage_args if a.startswith("stage="))
    return Path(out) / "tiny" / stage


def spawn(out: Path, stage_args: list[str], fault: str | None = None, *extra: str) -> subprocess.Popen:
    env = {**os.environ, **ONE_THREAD}
    env.pop(ckpt.FAULT_ENV, None)
    if fault:
        env[ckpt.FAULT_ENV] = fault
    return subprocess.Popen([sys.executable, "-m", "framecast.cli", *argv(out, stage_args, *extra)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run_to_fault(out: Path, stage_args: list[str], fault: str, timeout: float = 300) -> dict:
    """Train with FRAMECAST_FAULT=`fault`; returns the exit code, stderr, seconds and what the kill left."""
    t0 = time.perf_counter()
    p = spawn(out, stage_args, fault)
    _, err = p.communicate(timeout=timeout)
    return {"rc": p.returncode, "stderr": err, "seconds": time.perf_counter() - t0,
            "left": inspect(run_dir(out, stage_args))}


def _wait_for_lock(p: subprocess.Popen, run: Path, timeout: float = 300) -> bool:
    """Wait until child `p` holds the run lock (training is about to start); False if it exited first."""
    lock, end = run / ".lock", time.monotonic() + timeout
    while p.poll() is None and time.monotonic() < end:
        try:
            if lock.read_text().strip() == str(p.pid):
                return True
        except OSError:
            pass
        time.sleep(0.002)
    return False


def random_kills(out: Path, stage_args: list[str], kills: int, rng, max_delay: float, *extra: str) -> dict:
    """`kills` lives of runs of `stage_args` (+ `extra` overrides), each SIGKILLed after a random delay in
    [0, max_delay) once it holds the run lock. A run whose final checkpoint exists (or that finished before its
    kill) is followed by a fresh one in another folder. Returns every life (exit code, delay, the newest
    checkpoint before and after, what it left) and the run folders used."""
    lives, runs = [], [Path(out) / "r0"]
    final = f"step_{[int(a.split('=')[1]) for a in (*COMMON, *extra) if a.startswith('train.steps=')][-1]:07d}"
    while sum(life["killed"] for life in lives) < kills:
        run = run_dir(runs[-1], stage_args)
        before = inspect(run)["newest"]
        p = spawn(runs[-1], stage_args, None, *extra)
        delay = rng.uniform(0, max_delay)
        if _wait_for_lock(p, run):
            time.sleep(delay)
            p.send_signal(signal.SIGKILL)
        p.communicate()
        left = inspect(run)
        lives.append({"run": runs[-1].name, "rc": p.returncode, "killed": p.returncode == -signal.SIGKILL,
                      "delay": delay, "before": before, "left": left})
        if p.returncode == 0 or left["newest"] == final:
            runs.append(Path(out) / f"r{len(runs)}")
    return {"lives": lives, "runs": runs}


def inspect(run: Path) -> dict:
    """What a run's ckpt/ holds: the newest complete checkpoint, the pointer, leftovers, incomplete folders."""
    root = run / "ckpt"
    names = sorted(p.name for p in root.iterdir()) if root.is_dir() else []
    pointer = (root / "latest").read_text().strip() if (root / "latest").is_file() else None
    newest = next((p.name for p, why in ckpt.scan(root) if why is None), None)
    return {"newest": newest, "pointer": pointer, "tmp": [n for n in names if n.startswith(".tmp_step_")],
            "pointer_tmp": ".latest.tmp" in names, "incomplete": [p.name for p, why in ckpt.scan(root) if why],
            "corrupt": [n for n in names if n.startswith(".corrupt_")]}


def rows(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.is_file() else []


def snapshot(run: Path) -> dict:
    """Everything a finished run must share with an uninterrupted one: every checkpoint's weights files (sha256),
    the metrics rows without their wall-clock `time`, the pointer and the ckpt/ folder's names."""
    root = run / "ckpt"
    weights = {f"{d.name}/{f.name}": hashlib.sha256(f.read_bytes()).hexdigest()
               for d in sorted(root.glob("step_*")) for f in sorted(d.glob("*.safetensors"))}
    return {"weights": weights, "rows": [{k: v for k, v in r.items() if k != "time"} for r in rows(run)],
            "latest": (root / "latest").read_text().strip(), "names": sorted(p.name for p in root.iterdir())}


def expected_resume(fault: str) -> int:
    """The step a re-run must resume from after a kill at `fault` (`<point>:<nth>`, the save of step 2 * nth)."""
    point, _, nth = fault.partition(":")
    step = EVERY * int(nth or 1)
    saved = ckpt.FAULT_POINTS.index(point) >= ckpt.FAULT_POINTS.index("after_rename")
    return step if saved else step - EVERY
