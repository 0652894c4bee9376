"""Kill and resume (architecture.md §5): a run SIGKILLed at any point of a checkpoint save, or at a random moment,
resumes to checkpoints and metrics bit-identical with an uninterrupted run's; a stale or dangling pointer, a
corrupt newest checkpoint, leftovers of interrupted saves and rows of redone steps never block or bend a resume;
a NaN loss stops training with one clear error and leaves the last good checkpoint as it was.

Killed runs are `python -m framecast.cli train` subprocesses (tests/kill_helpers.py) with FRAMECAST_FAULT set
or SIGKILLed after a random delay; they start (seconds of imports each) two at a time in the background from the
start of this module (`campaign`), while the in-process work (references, re-runs, unit tests) goes on.

    python3 -m pytest -q -p no:cacheprovider tests/test_kill_resume.py            # stage0 at every point
    python3 -m pytest -q -p no:cacheprovider -m slow tests/test_kill_resume.py    # every stage, 20+ random kills
"""

from __future__ import annotations

import hashlib
import json
import random
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from framecast.cli import main
from framecast.train import checkpoint as ckpt
from framecast.train.loop import TrainingDiverged, truncate_log

from .kill_helpers import (
    STEPS,
    argv,
    expected_resume,
    random_kills,
    rows,
    run_dir,
    run_to_fault,
    snapshot,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors; in-process runs use one thread like the children

FEW = ["cd.grid_steps=8", "few_step.denoising_steps=[1000,500]"]
STAGES = {  # stage -> its arguments, given the base checkpoints {stage0, stage1, cd} (test_distill.py's base_ckpts)
    "stage0": lambda b: ["stage=stage0"],
    "stage1": lambda b: ["stage=stage1", f"init={b['stage0']}", "train.ema_decay=0.9"],
    "cd": lambda b: ["stage=cd", f"init={b['stage1']}", f"cd.teacher={b['stage1']}", *FEW],
    "dmd": lambda b: ["stage=dmd", f"init={b['cd']}", f"dmd.real={b['stage0']}", f"dmd.critic={b['stage0']}",
                      "dmd.critic_ratio=2", "train.ema_decay=0.5", *FEW],
}
FAULTS = [f"{p}:2" for p in ckpt.FAULT_POINTS] + ["after_weights:1", "during_pointer:1", "after_rename:3",
                                                   "after_pointer:3"]  # :1 first save, :3 the final one
DEFAULT = {"stage0": [f"{p}:2" for p in ckpt.FAULT_POINTS] + ["after_weights:1", "after_rename:3"],
           "stage1": ["after_rename:2"], "cd": ["after_state:2"], "dmd": ["during_pointer:2"]}
POINT_CASES = [pytest.param(s, f, id=f"{s}-{f}", marks=() if f in DEFAULT[s] else pytest.mark.slow)
               for s in STAGES for f in FAULTS]
RANDOM_CASES = [pytest.param("stage0", 3, id="stage0-3")] + [
    pytest.param(s, 20, id=f"{s}-20", marks=pytest.mark.slow) for s in STAGES]
RANDOM_RUN = ["train.steps=12", "train.ckpt_every=1"]  # a save after every step: kills often land in one
MAX_DELAY = {"stage0": 0.4, "stage1": 0.45, "cd": 0.55, "dmd": 0.8}  # about a child's time from lock to step 12
PRE_RENAME = ("after_weights", "after_state", "after_meta", "before_rename")


class Campaign:
    """The module's subprocess jobs (those of the selected tests), two at a time in the background."""

    def __init__(self, tmp: Path) -> None:
        self.tmp, self.pool, self.jobs, self.base, self.refs = tmp, ThreadPoolExecutor(2), {}, {}, {}

    def args(self, stage: str) -> list[str]:
        return STAGES[stage](self.base)

    def submit(self, key: tuple) -> None:
        kind, stage, x = key
        out = self.tmp / f"{kind}-{stage}-{str(x).replace(':', '-')}"
        if kind == "point":
            self.jobs[key] = self.pool.submit(lambda: {**run_to_fault(out, self.args(stage), x), "out": out})
        else:
            rng = random.Random(f"{stage}-{x}")
            self.jobs[key] = self.pool.submit(random_kills, out, self.args(stage), x, rng, MAX_DELAY[stage],
                                              *RANDOM_RUN)

    def result(self, key: tuple) -> dict:
        return self.jobs[key].result()

    def reference(self, stage: str, *extra: str) -> dict:
        """The snapshot of an uninterrupted in-process run of `stage` (one per stage and config)."""
        key = (stage, *extra)
        if key not in self.refs:
            out = self.tmp / f"ref-{stage}-{len(self.refs)}"
            assert main(argv(out, self.args(stage), *extra)) == 0
            self.refs[key] = snapshot(run_dir(out, self.args(stage)))
        return self.refs[key]


def _build_base(out: Path) -> dict[str, Path]:
    """stage0, stage1 and cd checkpoints of 2 steps: the init / teacher / real / critic of the later stages."""
    p0 = _train(out, "stage=stage0")
    p1 = _train(out, "stage=stage1", f"init={p0}")
    return {"stage0": p0, "stage1": p1, "cd": _train(out, "stage=cd", f"init={p1}", f"cd.teacher={p1}", *FEW)}


def _train(out: Path, *args: str) -> Path:
    assert main(argv(out, list(args), "train.steps=2")) == 0
    return ckpt.resolve(run_dir(out, list(args)))


@pytest.fixture(scope="module", autouse=True)
def campaign(request, tmp_path_factory):
    c = Campaign(tmp_path_factory.mktemp("kill"))
    keys = []  # one job per selected kill test of this module
    for item in request.session.items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if item.module is request.module and "stage" in params:
            kind = "point" if "fault" in params else "random"
            keys.append((kind, params["stage"], params["fault"] if kind == "point" else params["kills"]))
    for key in [k for k in keys if k[1] == "stage0"]:  # stage0 needs no base checkpoints: its children start first
        c.submit(key)
    if any(k[1] != "stage0" for k in keys):
        c.base = _build_base(c.tmp / "base")
        for key in [k for k in keys if k[1] != "stage0"]:
            c.submit(key)
    yield c
    c.pool.shutdown(wait=True, cancel_futures=True)


def _resume(run_args: list[str], out: Path) -> float:
    """Re-run the same command without the fault (in-process); returns its seconds."""
    t0 = time.perf_counter()
    assert main(argv(out, run_args)) == 0
    return time.perf_counter() - t0


# ------------------------------------------------------------------------------------------------
# Units (first: they run while the killed children of `campaign` start): pointer, fallback, leftovers,
# metrics, re-saves, divergence
# ------------------------------------------------------------------------------------------------


def _stage0(tmp_path: Path, *extra: str) -> tuple[list[str], Path]:
    """Train stage0 in `tmp_path` (`extra`: overrides such as a shorter train.steps); its args and run folder."""
    args = ["stage=stage0"]
    assert main(argv(tmp_path, args, *extra)) == 0
    return args, run_dir(tmp_path, args)


def test_the_pointer_is_only_a_hint(tmp_path, capsys):
    args, run = _stage0(tmp_path)
    root = run / "ckpt"
    (root / "latest").write_text("step_0000099")  # names a folder that does not exist
    assert ckpt.latest(root) == ckpt.resolve(run) == root / "step_0000006"
    (root / "latest").write_text("step_0000002")  # names an older one (a kill before the pointer update)
    assert ckpt.resolve(run) == root / "step_0000006"
    for name, drop in (("step_0000008", "model.safetensors"), ("step_0000010", "trainer_state.pt")):
        (root / name).mkdir()  # incomplete folders: a file of the manifest is missing
        for f in (root / "step_0000006").iterdir():
            if f.name != drop:
                (root / name / f.name).write_bytes(f.read_bytes())
    (root / "latest").write_text("step_0000010")
    assert ckpt.latest(root) == ckpt.resolve(root) == root / "step_0000006"
    assert ckpt.latest(root) == root / "step_0000006"
    err = capsys.readouterr().err
    assert err.count("step_0000010") == 1 and err.count("step_0000008") == 1  # one warning per folder
    assert "trainer_state.pt is missing" in err and "model.safetensors is missing" in err
    assert main(argv(tmp_path, args)) == 0  # the trainer sets them aside and points `latest` at step 6
    assert (root / "latest").read_text() == "step_0000006" and not (root / "step_0000010").exists()
    assert (root / ".corrupt_step_0000010").is_dir() and (root / ".corrupt_step_0000008").is_dir()


@pytest.mark.parametrize("damage", ["truncate", "scramble"])
def test_a_corrupt_newest_checkpoint_falls_back_with_one_warning(campaign, tmp_path, capsys, damage):
    args, run = _stage0(tmp_path)
    f = run / "ckpt" / "step_0000006" / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x07" * 64 + data[64:])
    if damage == "truncate":  # the manifest tells: resolve and the trainer skip it
        assert ckpt.resolve(run).name == "step_0000004"
    assert main(argv(tmp_path, args)) == 0  # resumes from step 4 and trains steps 5, 6 again
    err = capsys.readouterr().err
    assert err.count("warning: checkpoint") == 1 and "step_0000006" in err and "\n" not in err.strip()
    got, ref = snapshot(run), campaign.reference("stage0")
    assert got["weights"] == ref["weights"] and got["rows"] == ref["rows"] and got["latest"] == "step_0000006"
    assert got["names"] == sorted([*ref["names"], ".corrupt_step_0000006"])


def test_leftovers_of_interrupted_saves_are_removed_when_a_run_starts(tmp_path):
    args, run = _stage0(tmp_path, "train.steps=4")
    root = run / "ckpt"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_0000002", "step_0000004"]
    (root / ".tmp_step_0000006_4242").mkdir()
    (root / ".tmp_step_0000006_4242" / "model.safetensors").write_bytes(b"half")
    (root / ".latest.tmp").write_text("step_00")
    assert main(argv(tmp_path, args)) == 0
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_0000002", "step_0000004", "step_0000006"]


def test_metrics_keep_no_rows_of_redone_steps(campaign, tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "model/loss": s / 10}) + "\n" for s in range(1, 9)) + '{"st')
    truncate_log(path, 4)  # rows after step 4 and the torn last line go
    assert [r["step"] for r in rows(tmp_path)] == [1, 2, 3, 4] and sorted(p.name for p in tmp_path.iterdir()) == [
        "metrics.jsonl"]
    args, run = _stage0(tmp_path, "train.steps=4")  # issue 5: a run that logged steps 5, 6 and died
    with (run / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"step": 5, "model/loss": 9.0}) + "\n" + json.dumps({"step": 6, "model/loss": 9.0}) + "\n")
    assert main(argv(tmp_path, args)) == 0
    assert snapshot(run)["rows"] == campaign.reference("stage0")["rows"]
    assert [r["step"] for r in rows(run)] == list(range(1, STEPS + 1))


def test_a_resave_of_a_complete_checkpoint_is_a_no_op_and_an_incomplete_one_is_replaced(tmp_path):
    import torch

    root = tmp_path / "ckpt"
    w = {"m": {"w": torch.ones(2)}}
    first = ckpt.save(root, 5, weights=w, meta={"a": 1}, state={"step": 5})
    stamp = (first / "m.safetensors").stat().st_mtime_ns
    assert ckpt.save(root, 5, weights=w, meta={"a": 1}, state={"step": 5}) == first
    assert (first / "m.safetensors").stat().st_mtime_ns == stamp
    assert ckpt.read_meta(first)["files"] == {"m.safetensors": (first / "m.safetensors").stat().st_size,
                                              "trainer_state.pt": (first / "trainer_state.pt").stat().st_size}
    (first / "trainer_state.pt").unlink()  # incomplete now: the re-save replaces it
    assert ckpt.save(root, 5, weights=w, meta={"a": 1}, state={"step": 5}) == first
    assert ckpt.incomplete(first) is None and (root / ".corrupt_step_0000005").is_dir()
    assert sorted(p.name for p in root.iterdir()) == [".corrupt_step_0000005", "latest", "step_0000005"]


def _hashes(folder: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(folder.iterdir())}


def test_a_nan_loss_stops_with_one_clear_error_and_keeps_the_last_good_checkpoint(tmp_path, capsys, monkeypatch):
    from framecast.objectives.diffusion import FlowMatching

    args, run = _stage0(tmp_path, "train.steps=2")
    good, before = run / "ckpt" / "step_0000002", _hashes(run / "ckpt" / "step_0000002")
    orig = FlowMatching.losses

    def nan_at_step_4(self, batch, step, g):
        out = orig(self, batch, step, g)
        return {k: (loss * float("nan"), logs) for k, (loss, logs) in out.items()} if step == 3 else out

    monkeypatch.setattr(FlowMatching, "losses", nan_at_step_4)
    capsys.readouterr()
    assert main(argv(tmp_path, args)) == 2  # resumes at 2, step 3 trains, step 4 diverges
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "training diverged: loss 'model' is nan at step 4" in err and str(good) in err
    assert _hashes(good) == before and (run / "ckpt" / "latest").read_text() == "step_0000002"
    assert sorted(p.name for p in (run / "ckpt").iterdir()) == ["latest", "step_0000002"]
    monkeypatch.undo()
    with pytest.raises(TrainingDiverged, match="loss 'model' is (nan|inf) at step 2.*step_0000001"):
        from framecast import config as C
        from framecast.recipe import train_stage

        cmd = argv(tmp_path, args, "name=lr", "train.lr=1e30", "train.ckpt_every=1")
        train_stage(C.load(cmd[2], cmd[3:]))


def test_every_fault_point_is_documented():
    for point in ckpt.FAULT_POINTS:
        assert f"\n    {point} " in ckpt.__doc__, point


# ------------------------------------------------------------------------------------------------
# Kills at every named point of a save, and at random moments
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stage,fault", POINT_CASES)
def test_a_kill_at_a_save_point_resumes_bit_identically(campaign, stage, fault):
    res, args = campaign.result(("point", stage, fault)), campaign.args(stage)
    run, left, point = run_dir(res["out"], args), res["left"], fault.split(":")[0]
    assert res["rc"] == -signal.SIGKILL, res["stderr"][-3000:]
    step = expected_resume(fault)
    assert left["newest"] == (f"step_{step:07d}" if step else None) and not left["incomplete"]
    assert bool(left["tmp"]) == (point in PRE_RENAME)  # what the fault point promises was left behind
    assert left["pointer_tmp"] == (point == "during_pointer")
    if point in ("after_rename", "during_pointer"):  # issue 1: `latest` names the checkpoint before the newest
        assert left["pointer"] != left["newest"]
    kept = [r for r in rows(run) if r["step"] <= step]
    seconds = _resume(args, res["out"])
    assert snapshot(run) == campaign.reference(stage)  # every weights file, rows without `time`, names, pointer
    assert [r for r in rows(run) if r["step"] <= step] == kept  # it resumed: the rows before are the killed run's
    print(f"\nKILL {stage} {fault}: killed after {res['seconds']:.1f} s, left {left}; re-run resumed at step {step} "
          f"in {seconds:.2f} s; bit-identical")


@pytest.mark.parametrize("stage,kills", RANDOM_CASES)
def test_random_kills_resume_bit_identically(campaign, stage, kills):
    res, args = campaign.result(("random", stage, kills)), campaign.args(stage)
    lives = res["lives"]
    assert sum(life["killed"] for life in lives) >= kills
    bad = [life for life in lives if life["rc"] not in (0, -signal.SIGKILL) or life["left"]["incomplete"]]
    assert not bad, bad  # every life was killed or finished; no kill left an incomplete step_N
    ref, runs = campaign.reference(stage, *RANDOM_RUN), [out for out in res["runs"] if run_dir(out, args).exists()]
    for out in runs:
        assert main(argv(out, args, *RANDOM_RUN)) == 0  # finishes a killed run (a no-op for a finished one)
        assert snapshot(run_dir(out, args)) == ref
    states: dict[str, int] = {}
    for life in lives:
        left = life["left"]
        what = ("in a save, before the rename" if left["tmp"] else "in a pointer update" if left["pointer_tmp"] else
                "after a rename, before the pointer" if left["pointer"] != left["newest"] else
                "before any progress" if left["newest"] == life["before"] else "between saves")
        states[what] = states.get(what, 0) + 1
    print(f"\nRANDOM {stage}: {sum(life['killed'] for life in lives)} kills in {len(lives)} lives over {len(runs)} "
          f"runs of {RANDOM_RUN}; kills landed {states}; newest checkpoint after each: "
          f"{[life['left']['newest'] and int(life['left']['newest'][5:]) for life in lives]}; 0 unresumable, "
          f"all bit-identical")
