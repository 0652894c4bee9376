"""Bad input is a user error (architecture.md §5): every case below, run through `framecast.cli.main`, exits with
code 2 and prints exactly one line on stderr that names the key, flag or file at fault, and leaves every file of
the existing run, recording and pair store (and of the damaged copy it was given) as it was.

The fixtures are a tiny trained run, a tiny MiniGrid recording and a tiny ODE-pair store made by the CLI itself;
each case that needs a damaged file gets its own copy to damage.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from framecast import cli

TINY = str(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml")
# a CUDA device this machine lacks: plain `cuda` on a CPU machine, one past the last GPU elsewhere
NO_CUDA = "cuda" if not torch.cuda.is_available() else f"cuda:{torch.cuda.device_count()}"
RECORD = ["--episodes", "4", "--frames", "4", "--size", "16", "--tile", "2", "--shard-size", "2"]
PAIR_KEYS = ["ode.num_pairs=2", "ode.shard_size=1", "ode.grid_steps=8", "few_step.denoising_steps=[1000,500]",
             "train.progress=false"]


@dataclass
class Fx:
    root: Path  # everything the fixtures made; no case may change a file under it
    runs: Path
    run: Path  # the trained run (runs/tiny/stage1)
    step: Path  # its checkpoint folder
    rec: Path | None  # the recording (None without the [world] extra)
    pairs: Path


@pytest.fixture(scope="module")
def fx(tmp_path_factory, one_thread) -> Fx:
    root = tmp_path_factory.mktemp("bad_input")
    runs = root / "runs"
    assert cli.main(["train", "--config", TINY, "train.steps=2", f"out_dir={runs}", "train.progress=false"]) == 0
    run = runs / "tiny" / "stage1"
    step = next((run / "ckpt").glob("step_*"))
    rec = None
    try:
        import minigrid  # noqa: F401
        rec = root / "rec"
        assert cli.main(["record", "minigrid", "--out", str(rec), *RECORD]) == 0
    except ImportError:
        pass
    pairs = root / "pairs"
    assert cli.main(["pairs", "--config", TINY, f"ode.teacher={run}", f"ode.pairs_dir={pairs}", f"out_dir={runs}",
                     *PAIR_KEYS]) == 0
    return Fx(root, runs, run, step, rec, pairs)


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under `root`: relative name -> (size, mtime in ns); folders by name only (a lock file made and
    removed again changes its folder's mtime, not a file)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            out[str((Path(dirpath) / name).relative_to(root)) + "/"] = (0, 0)
        for name in filenames:
            st = (Path(dirpath) / name).stat()
            out[str((Path(dirpath) / name).relative_to(root))] = (st.st_size, st.st_mtime_ns)
    return out


# --- damaged copies: each writes the case's input into `case` (a fresh folder) -----------------------------------


def _tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str] | None]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def _rewrite(path: Path, change: Callable[[dict[str, torch.Tensor]], None]) -> None:
    t, meta = _tensors(path)
    change(t)
    save_file(t, str(path), metadata=meta)


def _copy(src: Path, case: Path) -> Path:
    shutil.copytree(src, case)
    return case


def meta_list(fx, case):
    _copy(fx.step, case)
    (case / "meta.json").write_text("[]")


def meta_without_sampling(fx, case):
    _copy(fx.step, case)
    meta = json.loads((case / "meta.json").read_text())
    meta.pop("sampling")
    (case / "meta.json").write_text(json.dumps(meta))


def recipe(text: str):
    def write(fx, case):
        case.mkdir()
        (case / "recipe.yaml").write_text(text.format(cfg=TINY))
    return write


def binary_config(fx, case):
    case.mkdir()
    (case / "binary.yaml").write_bytes(bytes(range(256)) * 4)


def pair_manifest_list(fx, case):
    _copy(fx.pairs, case)
    (case / "manifest.json").write_text("[1, 2]")


def pair_wrong_shape(fx, case):
    _copy(fx.pairs, case)
    _rewrite(case / "shard_00001.safetensors", lambda t: t.update(states=t["states"][:, 0]))  # no anchor axis


def pair_nan(fx, case):
    _copy(fx.pairs, case)
    _rewrite(case / "shard_00000.safetensors", lambda t: t["endpoint"].view(-1).__setitem__(3, float("nan")))


def corrupt_timing(fx, case):
    _copy(fx.pairs, case)
    (case / "timing.json").write_text('{"0": 1.5, "1": ')


def _recording(fx, case):
    if fx.rec is None:
        pytest.skip("recordings need the [world] extra: pip install -e '.[world]'")
    return _copy(fx.rec, case)


def shard_without_actions(fx, case):
    _rewrite(_recording(fx, case) / "shard_00001.safetensors", lambda t: t.pop("actions"))


def manifest_without_keys(fx, case):
    (_recording(fx, case) / "manifest.json").write_text('{"env": "minigrid"}')


def truncated_manifest(fx, case):
    path = _recording(fx, case) / "manifest.json"
    path.write_text(path.read_text()[:60])


def truncated_shard(fx, case):
    path = _recording(fx, case) / "shard_00001.safetensors"
    path.write_bytes(path.read_bytes()[:-200])


# --- the cases ---------------------------------------------------------------------------------------------------


@dataclass
class Case:
    argv: list[str]  # placeholders: {runs} {run} {case} (the damaged copy) {tmp} (an empty folder)
    names: str  # what the one line must name: the key, the flag or (with placeholders) the file
    damage: Callable | None = None
    new_files_ok: bool = False  # the command may leave a new, empty run folder in {tmp} (train_stage's mkdir)


TRAIN = ["train", "--config", TINY, "out_dir={runs}"]  # over the existing run: it must not be touched
SAMPLE = ["sample", "--ckpt", "{run}", "--out", "{tmp}/clip"]
PLAY = ["play", "--ckpt", "{run}"]
PAIRS = ["pairs", "--config", TINY, "ode.teacher={run}", "ode.pairs_dir={case}", "out_dir={tmp}", *PAIR_KEYS]
EPISODES = [*TRAIN, "data.name=episodes", "data.path={case}", "model.num_actions=4"]
RECORD_INTO = ["record", "minigrid", "--out", "{case}", *RECORD]

CASES = {
    # 15: tracebacks before
    "train.steps=0": Case([*TRAIN, "train.steps=0"], "train.steps"),
    "train.device=cuda without CUDA": Case([*TRAIN, f"train.device={NO_CUDA}"], "train.device"),
    "model.num_heads=0": Case([*TRAIN, "model.num_heads=0"], "model.num_heads"),
    "out_dir=/dev/null": Case(["train", "--config", TINY, "out_dir=/dev/null"], "out_dir"),
    "recipe stage key a number": Case(["pipeline", "--recipe", "{case}/recipe.yaml", "--out", "{runs}"],
                                      "{case}/recipe.yaml", recipe("name: tiny\nbase: {cfg}\nstages:\n  5: {{}}\n")),
    "recipe stage a number": Case(["pipeline", "--recipe", "{case}/recipe.yaml", "--out", "{runs}"],
                                  "{case}/recipe.yaml", recipe("name: tiny\nbase: {cfg}\nstages:\n  stage1: 5\n")),
    "meta.json is []": Case(["sample", "--ckpt", "{case}", "--out", "{tmp}/clip"], "{case}/meta.json", meta_list),
    "meta.json is [] (init=)": Case([*TRAIN, "init={case}"], "{case}/meta.json", meta_list),
    "meta.json lacks sampling": Case(["sample", "--ckpt", "{case}", "--out", "{tmp}/clip"], "{case}/meta.json",
                                     meta_without_sampling),
    "sample --num 0": Case([*SAMPLE, "--num", "0"], "--num"),
    "sample --frames -3": Case([*SAMPLE, "--frames", "-3"], "--frames"),
    "sample --threads -1": Case([*SAMPLE, "--threads", "-1"], "--threads"),
    "play --device cuda without CUDA": Case([*PLAY, "--device", NO_CUDA], "--device"),
    "pair manifest a list": Case(PAIRS, "{case}/manifest.json", pair_manifest_list),
    "pair tensors of the wrong shape": Case(PAIRS, "{case}/shard_00001.safetensors", pair_wrong_shape),
    "NaN pairs": Case(PAIRS, "{case}/shard_00000.safetensors", pair_nan),
    "NaN pairs (train stage=ode)": Case(["train", "--config", TINY, "stage=ode", "init={run}", "ode.teacher={run}",
                                         "ode.pairs_dir={case}", "out_dir={tmp}", *PAIR_KEYS],
                                        "{case}/shard_00000.safetensors", pair_nan, new_files_ok=True),
    "episode shard without actions": Case(EPISODES, "{case}/shard_00001.safetensors", shard_without_actions),
    "episode manifest without keys": Case(EPISODES, "{case}/manifest.json", manifest_without_keys),
    # 16: messages that named neither the file nor the key
    "binary --config": Case(["train", "--config", "{case}/binary.yaml"], "{case}/binary.yaml", binary_config),
    "train.seed=1e20": Case([*TRAIN, "train.seed=1e20"], "train.seed"),
    "train.seed beyond int64": Case([*TRAIN, "train.seed=100000000000000000000"], "train.seed"),
    "corrupt timing.json": Case(PAIRS, "{case}/timing.json", corrupt_timing),
    "record into a truncated manifest": Case(RECORD_INTO, "{case}/manifest.json", truncated_manifest),
    "record over a manifest without keys": Case(RECORD_INTO, "{case}/manifest.json", manifest_without_keys),
    # 17: nonsense accepted with exit 0
    "flow.shift=-1": Case([*TRAIN, "flow.shift=-1"], "flow.shift"),
    "train.ckpt_every=-1": Case([*TRAIN, "train.ckpt_every=-1"], "train.ckpt_every"),
    "data.text_tokens=0": Case([*TRAIN, "data.text_tokens=0"], "data.text_tokens"),
    "sample --steps 0": Case([*SAMPLE, "--steps", "0"], "--steps"),
    "sample --guidance nan": Case([*SAMPLE, "--guidance", "nan"], "--guidance"),
    "recipe with a repeated stage key": Case(["pipeline", "--recipe", "{case}/recipe.yaml", "--out", "{runs}"],
                                             "{case}/recipe.yaml", recipe("name: tiny\nbase: {cfg}\nstages:\n"
                                                                          "  stage1: {{}}\n  stage1: {{}}\n")),
    # 10: a re-run over a damaged recording
    "record over a truncated shard": Case(RECORD_INTO, "{case}/shard_00001.safetensors", truncated_shard),
    "record over a shard without actions": Case(RECORD_INTO, "{case}/shard_00001.safetensors",
                                                shard_without_actions),
    # the argument and value rules around them
    "few_step.denoising_steps increasing": Case([*TRAIN, "few_step.denoising_steps=[500,1000]"],
                                                "few_step.denoising_steps"),
    "few_step.denoising_steps past the grid": Case([*TRAIN, "few_step.denoising_steps=[2000]"],
                                                   "few_step.denoising_steps"),
    "train.device not a device": Case([*TRAIN, "train.device=gpu"], "train.device"),
    "sample --denoising-steps 2000": Case([*SAMPLE, "--denoising-steps", "2000"], "--denoising-steps"),
    "sample --device cuda without CUDA": Case([*SAMPLE, "--device", NO_CUDA], "--device"),
    "play --port 0": Case([*PLAY, "--port", "0"], "--port"),
    "play --port 70000": Case([*PLAY, "--port", "70000"], "--port"),
    "play --window 0": Case([*PLAY, "--window", "0"], "--window"),
    "play --max-sessions 0": Case([*PLAY, "--max-sessions", "0"], "--max-sessions"),
    "play --max-frames -1": Case([*PLAY, "--max-frames", "-1"], "--max-frames"),
    "play --fps inf": Case([*PLAY, "--fps", "inf"], "--fps"),
    "record --episodes 0": Case(["record", "minigrid", "--out", "{tmp}/rec", "--episodes", "0"], "--episodes"),
    "pipeline --out /dev/null": Case(["pipeline", "--recipe", TINY, "--out", "/dev/null"], "--out"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_line_naming_it_and_changes_nothing(name, fx, tmp_path, capsys):
    case = CASES[name]
    where = {"runs": fx.runs, "run": fx.run, "case": tmp_path / "case", "tmp": tmp_path / "tmp"}
    (tmp_path / "tmp").mkdir()
    if case.damage is not None:
        case.damage(fx, where["case"])
    argv = [a.format(**where) for a in case.argv]
    before, given = snapshot(fx.root), snapshot(tmp_path)
    capsys.readouterr()
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("framecast: error: ") and err.count("\n") == 1, err
    assert case.names.format(**where) in err, err
    assert snapshot(fx.root) == before  # no file of the run, recording or pair store changed
    after = snapshot(tmp_path)
    if case.new_files_ok:  # only new, empty folders
        assert {k: v for k, v in after.items() if k in given} == given
        assert all(k.endswith("/") for k in set(after) - set(given))
    else:
        assert after == given  # nor a file of the copy it was given (and nothing new)
