"""`framecast prepare` and the dataset store (data/video.py, data/store.py, data/prepare.py): real mp4/mov clips
written here, decoded, resampled, resized, encoded and sharded; resume, refusal, the streaming reader's order.

Clips (sorted = store order; shard size 2 -> shards [corrupt, moving] [ramp, short] [solid, sub/square]
[uncaptioned], holding 1, 1, 2 and 0 items):

    corrupt.mp4      random bytes                         skipped: ffmpeg cannot decode it
    moving.mp4       40 frames 40x56 @ 24 fps, a red square moving right
    ramp.mp4         36 frames 48x40 @ 24 fps, frame k uniformly grey 10 + 6k: shows which frames are kept
    short.mp4        2 frames @ 24 fps                    skipped: too short for 4 frames at 16 fps
    solid.mp4        30 frames 40x56 @ 24 fps, one colour
    sub/square.mov   20 frames 32x64 @ 12 fps, a green square (fps below 16: frames repeat)
    uncaptioned.mp4  a valid clip without a caption       skipped: no caption

The ODE-pair source (data/trajectories.py) reads its rows through the same memory-mapped shard reader.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import imageio.v2 as imageio
import numpy as np
import pytest
import torch
from safetensors import safe_open

from framecast import config as C
from framecast.data.prepare import add_arguments, prepare, read_captions, run
from framecast.data.store import StoreError, StoreSource, read_manifest
from framecast.data.video import VideoError, fit, read_video, source_indices
from framecast.errors import ConfigError, DataError
from framecast.models.codecs import IdentityCodec, uint8_to_pixels
from framecast.models.conditioning import build_text_encoder
from framecast.rng import Draws

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
SOLID = (200, 60, 20)
CAPTIONS = {"corrupt.mp4": "never decoded", "moving.mp4": "a red square moving right", "ramp.mp4": "grey ramp",
            "short.mp4": "too short", "solid.mp4": "an orange screen", "sub/square.mov": "a green square"}
ITEMS = ["moving.mp4", "ramp.mp4", "solid.mp4", "sub/square.mov"]


def _write(path: Path, frames: np.ndarray, fps: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with imageio.get_writer(path, fps=fps, codec="libx264", macro_block_size=1, ffmpeg_log_level="error",
                            quality=None, output_params=["-qp", "0"]) as w:  # lossless: levels survive
        for f in frames:  # [h, w, 3] uint8
            w.append_data(f)


def _square(n: int, h: int, w: int, colour, bg) -> np.ndarray:
    v = np.empty((n, h, w, 3), np.uint8)
    v[:] = bg
    for k in range(n):
        v[k, h // 2 - 5:h // 2 + 5, w // 2 - 8 + k:w // 2 + 2 + k] = colour  # inside the centre crop
    return v


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("clips")
    vids = root / "videos"
    _write(vids / "moving.mp4", _square(40, 40, 56, (230, 30, 30), (20, 20, 80)), 24)
    _write(vids / "ramp.mp4", np.broadcast_to((10 + 6 * np.arange(36, dtype=np.uint8))[:, None, None, None],
                                              (36, 48, 40, 3)), 24)
    _write(vids / "short.mp4", np.full((2, 40, 56, 3), 128, np.uint8), 24)
    _write(vids / "solid.mp4", np.broadcast_to(np.array(SOLID, np.uint8), (30, 40, 56, 3)), 24)
    _write(vids / "sub" / "square.mov", _square(20, 32, 64, (30, 220, 30), (90, 90, 90)), 12)
    _write(vids / "uncaptioned.mp4", np.full((24, 40, 56, 3), 50, np.uint8), 24)
    (vids / "corrupt.mp4").write_bytes(np.random.default_rng(0).bytes(3000))
    (root / "captions.json").write_text(json.dumps(CAPTIONS))
    return root


def _cfg(tmp: Path, *extra: str) -> C.RunConfig:
    return C.load(TINY, [f"out_dir={tmp}", *extra])


def _prepare(clips: Path, out: Path, *extra: str, captions: str = "captions.json", **kw) -> Path:
    kw.setdefault("shard_size", 2)
    return prepare(_cfg(out.parent, *extra), videos=str(clips / "videos"), captions=str(clips / captions),
                   out=out, progress=False, **kw)


def _files(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(root.iterdir())}


@pytest.fixture(scope="module")
def store(clips, tmp_path_factory) -> Path:
    """The reference store: prepared once, uninterrupted."""
    return _prepare(clips, tmp_path_factory.mktemp("ref") / "store")


def _source(store: Path, *extra: str, tokens: int = 8) -> StoreSource:
    cfg = _cfg(store.parent, "data.name=store", f"data.path={store}", *extra)
    return StoreSource(cfg.data, build_text_encoder("hash", 32, tokens, cfg.data.seed), IdentityCodec(3))


def _rows(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()["framecast"])


def test_the_manifest_records_settings_counts_and_skipped_inputs(store, clips):
    m = read_manifest(store)
    assert m["format"] == "framecast-store" and m["version"] == 1 and m["complete"] is True
    assert m["source"] == {"kind": "videos", "videos": str((clips / "videos").resolve()),
                           "captions": str((clips / "captions.json").resolve())}
    assert m["inputs"]["count"] == 7 and m["items"] == 4 and m["shards"] == [1, 1, 2, 0] and m["shard_size"] == 2
    assert m["codec"] == {"name": "identity", "source": ""}
    assert m["text_encoder"] == {"name": "hash", "source": "", "tokens": 8, "dim": 32, "seed": 0}
    assert m["latent"] == {"shape": [4, 3, 16, 16], "dtype": "bf16"}
    assert m["pixels"] == {"height": 16, "width": 16, "frames": 4, "fps": 16}
    skipped = {s["path"]: s["reason"] for s in m["skipped"]}
    assert list(skipped) == ["corrupt.mp4", "short.mp4", "uncaptioned.mp4"]
    assert "cannot decode" in skipped["corrupt.mp4"] and "too short: 2 frames" in skipped["short.mp4"]
    assert skipped["uncaptioned.mp4"] == f"no caption in {(clips / 'captions.json').resolve()}"
    assert sorted(p.name for p in store.iterdir() if not p.name.startswith(".")) == [
        "manifest.json", "null.safetensors", *(f"shard_{i:05d}.safetensors" for i in range(4))]
    metas = [_rows(store / f"shard_{i:05d}.safetensors")[1] for i in range(4)]
    assert [m["inputs"] for m in metas] == [[0, 2], [2, 4], [4, 6], [6, 7]]
    assert [p for m in metas for p in m["paths"]] == ITEMS
    assert [c for m in metas for c in m["captions"]] == [CAPTIONS[p] for p in ITEMS]
    assert [s["path"] for m in metas for s in m["skipped"]] == list(skipped)


def test_latents_are_the_codec_encoding_of_the_decoded_frames(store, clips):
    enc, rows = build_text_encoder("hash", 32, 8, 0), {}
    for i in range(4):
        t, meta = _rows(store / f"shard_{i:05d}.safetensors")
        assert t["latents"].dtype == torch.bfloat16 and t["text"].dtype == torch.bfloat16
        assert t["latents"].shape == (len(meta["paths"]), 4, 3, 16, 16) and t["text"].shape[1:] == (8, 32)
        for j, p in enumerate(meta["paths"]):
            rows[p] = t["latents"][j].float()
            frames = read_video(clips / "videos" / p, 4, 16, 16, 16)
            assert torch.equal(t["latents"][j], IdentityCodec(3).encode(uint8_to_pixels(frames)[None])[0].bfloat16())
        assert torch.equal(t["text"], enc.encode(meta["captions"]).bfloat16() if meta["captions"] else t["text"])
    levels = (rows["solid.mp4"] + 1) * 127.5  # [F, 3, 16, 16]
    # a solid clip gives constant frames (up to ffmpeg's RGB conversion, which differs by 1-2 levels at the borders)
    assert (levels.amax((2, 3)) - levels.amin((2, 3))).max() <= 3
    assert (levels.mean((2, 3)) - torch.tensor(SOLID)).abs().max() <= 3
    grey = ((rows["ramp.mp4"] + 1) * 127.5).mean((1, 2, 3))  # [F]
    assert (grey - torch.tensor([10.0, 22, 28, 40])).abs().max() <= 2  # 24 -> 16 fps keeps frames 0, 2, 3, 5
    null, _ = _rows(store / "null.safetensors")
    assert torch.equal(null["null"], enc.encode([""])[0].bfloat16())


def test_frames_are_resampled_to_the_nearest_time_and_centre_cropped(clips):
    assert source_indices(6, 24, 16) == [0, 2, 3, 5, 6, 8] and source_indices(4, 12, 16) == [0, 1, 2, 2]
    assert source_indices(3, 16, 16) == [0, 1, 2] and source_indices(3, 29.97, 16) == [0, 2, 4]
    img = torch.zeros(1, 3, 32, 48, dtype=torch.uint8)  # thirds: red | green | blue
    for c in range(3):
        img[:, c, :, 16 * c:16 * (c + 1)] = 255
    out = fit(img, 16, 16)  # scale 1/2 -> 16x24, columns 4..19 kept
    assert out.shape == (1, 3, 16, 16) and out.dtype == torch.uint8
    assert (out[0, 0, :, :3] == 255).all() and (out[0, 1, :, 5:11] == 255).all() and (out[0, 2, :, 13:] == 255).all()
    assert (out[0, 1:, :, :3] == 0).all() and (out[0, ::2, :, 5:11] == 0).all()
    tall = fit(img.transpose(2, 3), 8, 16)  # [1, 3, 48, 32] -> 24x16 -> rows 8..15: green, blended at the edges
    assert (tall[0, 1, 1:7] == 255).all() and (tall[0, ::2, 1:7] == 0).all() and (tall[0, 1, [0, 7]] < 255).all()
    square = read_video(clips / "videos" / "sub" / "square.mov", 4, 16, 16, fps=16)  # 12 -> 16 fps repeats
    assert torch.equal(square[2], square[3]) and not torch.equal(square[0], square[1])
    for name, why in (("corrupt.mp4", "cannot decode"), ("short.mp4", "too short"), ("missing.mp4", "no such file")):
        with pytest.raises(VideoError, match=why) as e:
            read_video(clips / "videos" / name, 4, 16, 16)
        assert str(clips / "videos" / name) in str(e.value) and "\n" not in str(e.value)


def test_an_interrupted_prepare_finishes_with_the_same_shards(store, clips, tmp_path, capsys):
    out = tmp_path / "store"

    class Killed(Exception):
        pass

    def kill_after_first(i):
        raise Killed(i)

    with pytest.raises(Killed):
        _prepare(clips, out, on_shard=kill_after_first)
    assert "skipped corrupt.mp4: ffmpeg cannot decode it" in capsys.readouterr().out
    assert read_manifest(out)["complete"] is False
    assert sorted(p.name for p in out.glob("shard_*")) == ["shard_00000.safetensors"]
    with pytest.raises(StoreError, match="incomplete"):
        _source(out)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    (out / f".shard_00001.safetensors.{host}.{dead.pid}.tmp").write_bytes(b"half")  # what a SIGKILL mid-write leaves
    live = out / f".shard_00002.safetensors.{host}.{os.getppid()}.tmp"  # another rank still writing: kept
    live.write_bytes(b"in progress")
    first = (out / "shard_00000.safetensors").stat().st_mtime_ns
    written: list[int] = []
    _prepare(clips, out, on_shard=written.append)
    assert written == [1, 2, 3] and (out / "shard_00000.safetensors").stat().st_mtime_ns == first
    assert {k: v for k, v in _files(out).items() if not k.startswith(".")} == \
        {k: v for k, v in _files(store).items() if not k.startswith(".")}
    assert list(out.glob(".*.tmp")) == [live]
    live.unlink()
    again = _files(out)
    _prepare(clips, out, on_shard=written.append)  # a finished store: nothing is written
    assert written == [1, 2, 3] and _files(out) == again


def test_ranks_under_torchrun_write_their_own_shards(store, clips, tmp_path, monkeypatch):
    out, written = tmp_path / "store", []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    _prepare(clips, out, on_shard=written.append)
    assert written == [1, 3] and read_manifest(out)["complete"] is False
    monkeypatch.setenv("RANK", "0")
    _prepare(clips, out, on_shard=written.append)  # the last shard written: this rank completes the manifest
    assert written == [1, 3, 0, 2] and read_manifest(out)["complete"] is True
    assert {k: v for k, v in _files(out).items() if not k.startswith(".")} == \
        {k: v for k, v in _files(store).items() if not k.startswith(".")}


@pytest.mark.parametrize("change, key", [({"shard_size": 3}, "shard_size=2"),
                                         ({"dtype": "fp16"}, "latent.dtype='bf16'"), ({"fps": 8}, "pixels.fps=16"),
                                         (("data.height=32",), "latent.shape=[4, 3, 16"),
                                         (("data.text_tokens=4",), "text_encoder.tokens=8"),
                                         ({"captions": "other.json"}, "inputs.digest=")])
def test_other_settings_are_refused_and_leave_the_store_untouched(store, clips, tmp_path, change, key):
    root = tmp_path / "store"
    shutil.copytree(store, root)
    (clips / "other.json").write_text(json.dumps({**CAPTIONS, "ramp.mp4": "another caption"}))
    before = _files(root)
    extra, kw = (change, {}) if isinstance(change, tuple) else ((), change)
    with pytest.raises(StoreError) as e:
        _prepare(clips, root, *extra, **kw)
    assert key in str(e.value) and "--out" in str(e.value) and "\n" not in str(e.value)
    assert _files(root) == before
    (tmp_path / "stuff").mkdir()
    (tmp_path / "stuff" / "notes.txt").write_text("mine")
    with pytest.raises(StoreError, match="not empty and holds no manifest.json"):
        _prepare(clips, tmp_path / "stuff")
    assert [p.name for p in (tmp_path / "stuff").iterdir()] == ["notes.txt"]


def _draws(positions: list[int]) -> Draws:
    """The trainer's generators for samples at these global positions (step 0 of a run with a huge batch)."""
    return Draws.for_samples(0, 0, positions, global_batch=1 << 20, shared_seed=0)


def test_the_reader_visits_a_permutation_per_epoch_however_batches_are_split(store):
    src = _source(store)
    assert len(src) == 4
    whole = src.indices(12, _draws(list(range(12))))
    assert [sorted(whole[4 * e:4 * e + 4]) for e in range(3)] == [[0, 1, 2, 3]] * 3  # each epoch: every item once
    assert len({tuple(whole[4 * e:4 * e + 4]) for e in range(3)}) > 1  # reshuffled per epoch
    split = [j for part in ([0, 1, 2], [3, 4], [5, 6, 7, 8, 9, 10, 11]) for j in src.indices(len(part), _draws(part))]
    assert split == whole and _source(store).indices(3, _draws([9, 10, 11])) == whole[9:]  # exact from the position
    a, b = src.batch(5, _draws(list(range(3, 8)))), src.batch(2, _draws([6, 7]))
    assert torch.equal(a.video[3:], b.video) and torch.equal(a.cond.text[3:], b.cond.text)
    assert a.captions[3:] == b.captions
    assert a.video.dtype == torch.float32 and a.video.shape == (5, 4, 3, 16, 16) and a.null.text.shape == (5, 8, 32)
    assert a.null.text.data_ptr() != src.null.data_ptr()  # its own storage: pair stores save it
    g = src.batch(6, torch.Generator().manual_seed(3))  # a plain generator: uniform indices drawn from it
    want = torch.randint(0, 4, (6,), generator=torch.Generator().manual_seed(3)).tolist()
    assert g.captions == [CAPTIONS[ITEMS[j]] for j in want]
    t, _ = _rows(store / "shard_00002.safetensors")  # items 2, 3: solid, square
    assert torch.equal(src.batch(1, _draws([whole.index(3)])).video[0], t["latents"][1].float())


def test_the_reader_refuses_a_store_that_does_not_fit_or_is_damaged(store, tmp_path):
    with pytest.raises(ConfigError, match=r"latent.shape=\[4, 3, 16, 16\] but this run \(data.num_frames, data.height "
                                          r"and data.width\) has \[4, 3, 32, 16\]"):
        _source(store, "data.height=32")
    with pytest.raises(ConfigError, match=r"text_encoder.tokens=8 but this run \(data.text_tokens\) has 4"):
        _source(store, "data.text_tokens=4", tokens=4)
    with pytest.raises(ConfigError, match=r"text_encoder.seed=0 but this run \(data.seed\) has 5"):
        _source(store, "data.seed=5")
    root = tmp_path / "store"
    shutil.copytree(store, root)
    (root / "shard_00001.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(StoreError, match=f"shard {root / 'shard_00001.safetensors'} is corrupt"):
        _source(root)
    (root / "shard_00001.safetensors").unlink()
    with pytest.raises(StoreError, match=f"shard {root / 'shard_00001.safetensors'} is missing"):
        _source(root)
    (root / "manifest.json").write_text('{"format": ')
    with pytest.raises(StoreError, match=f"store manifest {root / 'manifest.json'} is corrupt"):
        _source(root)
    with pytest.raises(StoreError, match="manifest.json is missing"):
        _source(tmp_path / "nowhere")


def test_a_prompts_file_makes_a_prompts_only_store(tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle moving right slow\n\n  a blue square  \nthree\nfour\nfive\n")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    run(parser.parse_args(["--config", str(TINY), f"out_dir={tmp_path}", "--prompts", str(prompts),
                           "--out", str(tmp_path / "store"), "--shard-size", "2"]))
    assert "5 items in 3 shards, 0 skipped" in capsys.readouterr().out
    m = read_manifest(tmp_path / "store")
    assert m["source"] == {"kind": "prompts", "prompts": str(prompts.resolve())} and m["shards"] == [2, 2, 1]
    t, meta = _rows(tmp_path / "store" / "shard_00000.safetensors")
    assert sorted(t) == ["text"] and meta["captions"] == ["a red circle moving right slow", "a blue square"]
    src = _source(tmp_path / "store")
    b = src.batch(3, _draws([0, 1, 2]))
    assert torch.equal(b.video, torch.zeros(3, 4, 3, 16, 16))  # no latents: zeros of the store's shape
    assert torch.equal(b.cond.text, build_text_encoder("hash", 32, 8, 0).encode(b.captions).bfloat16().float())
    assert sorted(src.captions) == sorted(["a red circle moving right slow", "a blue square", "three", "four", "five"])
    with pytest.raises(ConfigError, match="not both"):
        prepare(_cfg(tmp_path), videos=str(tmp_path), captions=str(prompts), prompts=str(prompts), out=tmp_path / "x")


def test_captions_may_be_jsonl_or_csv(store, clips, tmp_path, capsys):
    rows = list(CAPTIONS.items())
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps({"path": p, "caption": c}) for p, c in rows) + "\n\n")
    (tmp_path / "c.csv").write_text("path,caption\n" + "".join(f'./{p},"{c}"\n' for p, c in rows))
    assert read_captions(tmp_path / "c.jsonl") == read_captions(tmp_path / "c.csv") == CAPTIONS
    (clips / "c.csv").write_text((tmp_path / "c.csv").read_text() + "gone.mp4,a typo\n")
    out = _prepare(clips, tmp_path / "csv_store", captions="c.csv")
    assert "1 captions in" in capsys.readouterr().out  # the stray row is reported, not fatal
    assert (out / "shard_00000.safetensors").read_bytes() == (store / "shard_00000.safetensors").read_bytes()
    assert read_manifest(out)["items"] == 4
    for text, name, why in (('{"path": "a.mp4"}\n', "bad.jsonl", "line 1"), ("path,text\na,b\n", "bad.csv", "caption"),
                            ('["a.mp4"]', "bad.json", "object"), ("{", "bad.json", "unreadable")):
        (tmp_path / name).write_text(text)
        with pytest.raises(DataError, match=why) as e:
            read_captions(tmp_path / name)
        assert str(tmp_path / name) in str(e.value)


def test_the_wan_vae_codec_takes_1_plus_4k_frames(clips, tmp_path):
    from tests.wan_tiny_vae import write_tiny_vae

    vae = write_tiny_vae(tmp_path / "vae")
    wan = ("model.codec=wan_vae", f"model.codec_source={vae}", "model.in_channels=4", "model.out_channels=4")
    with pytest.raises(ConfigError, match="data.num_frames=4 does not suit codec 'wan_vae'.*1 \\+ 4k"):
        _prepare(clips, tmp_path / "bad", *wan)
    assert not (tmp_path / "bad").exists()
    out = _prepare(clips, tmp_path / "store", *wan, "data.num_frames=5", shard_size=8, dtype="fp16")
    m = read_manifest(out)
    assert m["latent"] == {"shape": [2, 4, 2, 2], "dtype": "fp16"} and m["codec"]["name"] == "wan_vae"
    t, meta = _rows(out / "shard_00000.safetensors")
    from framecast.models.codecs import build_codec

    codec = build_codec("wan_vae", 4, vae)
    frames = read_video(clips / "videos" / meta["paths"][0], 5, 16, 16)
    with torch.no_grad():
        want = codec.encode(uint8_to_pixels(frames)[None])[0].half()
    assert t["latents"].dtype == torch.float16 and torch.equal(t["latents"][0], want)


def test_stage1_trains_on_a_prepared_store(store, tmp_path):
    from framecast.recipe import train_stage

    cfg = _cfg(tmp_path, "stage=stage1", "train.steps=2", "data.name=store", f"data.path={store}")
    ckpt = train_stage(cfg)
    assert (ckpt / "meta.json").is_file()
    assert len((cfg.run_dir / "metrics.jsonl").read_text().splitlines()) >= 2


def test_pair_source_reads_rows_lazily_and_takes_draws(tmp_path):
    from framecast.data.trajectories import PairSource, PairStore, PairStoreError

    manifest = {"teacher": "none", "anchors": [1.0, 0.5], "num_pairs": 5, "shard_size": 2}
    store, g = PairStore(tmp_path / "pairs", manifest), torch.Generator().manual_seed(0)
    for i in range(3):
        n = store.shard_len(i)
        t = {"states": torch.randn(n, 2, 3, 1, 2, 2, generator=g), "endpoint": torch.randn(n, 3, 1, 2, 2, generator=g),
             "clean": torch.randn(n, 3, 1, 2, 2, generator=g), "text": torch.randn(n, 4, 8, generator=g),
             "null": torch.zeros(n, 4, 8)}
        store.write(i, t, [f"pair {2 * i + j}" for j in range(n)])
    tensors, captions = store.load()
    src = PairSource(store)
    a = src.batch(6, _draws(list(range(6))))  # one generator per sample: rows do not depend on the split
    b = src.batch(2, _draws([4, 5]))
    assert torch.equal(a.extra["states"][4:], b.extra["states"]) and a.captions[4:] == b.captions
    idx = [captions.index(c) for c in a.captions]
    assert torch.equal(a.video, tensors["clean"][idx]) and torch.equal(a.extra["endpoint"], tensors["endpoint"][idx])
    assert torch.equal(a.cond.text, tensors["text"][idx]) and torch.equal(a.null.text, tensors["null"][idx])
    bad = {k: v.clone() for k, v in store._read(1)[0].items()}
    bad["endpoint"][1, 0] = float("nan")
    store.shard_path(1).unlink()
    store.write(1, bad, ["pair 2", "pair 3"])
    with pytest.raises(PairStoreError, match=f"pair shard {store.shard_path(1)} is corrupt.*NaN.*row 1"):
        PairSource(store)  # every row is scanned (one at a time) before any training step
