"""umT5 text encoder (Wan2.1, arXiv 2503.20314): both checkpoint layouts, Wan's masking and zeroed padding,
truncation, the in-memory and on-disk prompt caches, strict loading errors and the build_text_encoder entry.
Everything is a tiny encoder written offline by tests/wan_tiny_text.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from framecast.errors import CheckpointError, ConfigError, DataError  # noqa: E402
from framecast.models.conditioning import HashTextEncoder, build_text_encoder  # noqa: E402
from framecast.models.umt5 import (  # noqa: E402
    ORIGINAL_FILE,
    PromptCache,
    key_table,
    load_umt5,
    to_original,
    to_transformers,
)

from .conftest import RunsCode  # noqa: E402
from .wan_tiny_text import (  # noqa: E402
    SENTENCES,
    tiny_umt5_config,
    tiny_umt5_model,
    write_original_umt5_pth,
    write_transformers_text_encoder,
)

PROMPTS = ["a red circle moving left", "", "the camera pans slowly over a city at night"]
T = 12  # max_tokens: long enough for most test prompts, short enough to truncate SENTENCES joined


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    base = tmp_path_factory.mktemp("umt5")
    folder = write_transformers_text_encoder(base / "diffusers", 7)
    return folder, write_original_umt5_pth(base / "wan" / ORIGINAL_FILE, 7)


def counted(enc):
    calls = []
    enc.model.register_forward_pre_hook(lambda *_: calls.append(1))
    return calls


def manual(enc, prompts, max_tokens=T):
    tok = enc.tokenizer(prompts, padding="max_length", truncation=True, max_length=max_tokens, return_tensors="pt")
    with torch.no_grad():
        out = enc.model(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"]).last_hidden_state
    return out, tok["attention_mask"].bool(), tok["input_ids"]


def test_folder_and_original_pth_load_identically(roots):
    folder, pth = roots
    encs = [load_umt5(p, max_tokens=T) for p in (folder, folder / "text_encoder", pth, pth.parent)]
    x = encs[0].encode(PROMPTS)
    assert x.shape == (3, T, 32) and x.dtype == torch.float32 and encs[0].dim == 32
    for enc in encs[1:]:
        assert torch.equal(enc.encode(PROMPTS), x)
    other = load_umt5(write_original_umt5_pth(pth.parent.parent / "seed8" / ORIGINAL_FILE, 8), max_tokens=T)
    assert not torch.allclose(other.encode(PROMPTS), x)  # the seed reaches the weights
    half = load_umt5(folder, max_tokens=T, dtype=torch.bfloat16)  # CUDA's default weight dtype
    assert half.model.dtype == torch.bfloat16 and half.encode(PROMPTS).dtype == torch.float32
    torch.testing.assert_close(half.encode(PROMPTS), x, rtol=0.1, atol=0.1)


def test_padding_is_exactly_zero_and_the_rest_is_the_masked_forward(roots):
    enc = load_umt5(roots[0], max_tokens=T)
    x = enc.encode(PROMPTS)
    ref, mask, ids = manual(enc, PROMPTS)
    assert bool((~mask).any()) and bool((ref[~mask] != 0).any())  # padding exists and the raw model fills it
    assert bool((x[~mask] == 0).all())
    torch.testing.assert_close(x[mask], ref[mask], rtol=1e-5, atol=1e-6)
    assert ids[1, 0] == 1 and bool(mask[1].sum() == 1)  # "" is just </s>
    assert bool((x[1, 0] != 0).any())


def test_truncation_to_max_tokens(roots):
    enc = load_umt5(roots[0], max_tokens=T)
    long = " ".join(SENTENCES)
    assert len(enc.tokenizer(long)["input_ids"]) > T
    x = enc.encode([long])
    ref, mask, ids = manual(enc, [long])
    assert x.shape == (1, T, 32) and bool(mask.all()) and ids[0, -1] == 1  # eos kept at the end
    assert bool((x.abs().sum(-1) > 0).all())
    torch.testing.assert_close(x, ref, rtol=1e-5, atol=1e-6)


def test_memory_cache_hits_cost_no_forward_and_evict_lru(roots):
    enc = load_umt5(roots[0], max_tokens=T, cache_size=2)
    calls = counted(enc)
    a, b, c = PROMPTS
    x = enc.encode([a, b, a])
    assert len(calls) == 1 and torch.equal(x[0], x[2])
    y = enc.encode([b, a])
    assert len(calls) == 1 and torch.equal(y, x[[1, 0]])
    y.zero_()  # the caller's tensor is a copy
    assert torch.equal(enc.encode([a]), x[:1]) and len(calls) == 1
    enc.encode([c])  # evicts b, the least recently used
    assert len(calls) == 2
    enc.encode([a, c])
    assert len(calls) == 2
    assert torch.equal(enc.encode([b]), x[1:2]) and len(calls) == 3


def test_disk_cache_round_trips_atomically_and_survives_a_new_process(roots, tmp_path):
    enc = load_umt5(roots[0], max_tokens=T)
    cache = PromptCache(tmp_path / "cache", enc.encoder_id)
    assert cache.get(PROMPTS[0]) is None
    x = cache.encode_cached(PROMPTS + PROMPTS[:1], enc)
    files = sorted((tmp_path / "cache").rglob("*"))
    entries = [f for f in files if f.is_file()]
    assert len(entries) == 3 and not [f for f in entries if f.name.startswith(".tmp")]
    assert torch.equal(x[:3], enc.encode(PROMPTS)) and torch.equal(x[3], x[0])
    fresh = load_umt5(roots[1], max_tokens=T)  # another load, another layout: same encoder_id is the user's call
    calls = counted(fresh)
    assert torch.equal(PromptCache(tmp_path / "cache", enc.encoder_id).encode_cached(PROMPTS, fresh), x[:3])
    assert calls == []
    again = PromptCache(tmp_path / "again", enc.encoder_id)
    again.encode_cached(PROMPTS, enc)
    assert again.path(PROMPTS[2]).read_bytes() == cache.path(PROMPTS[2]).read_bytes()  # deterministic
    assert PromptCache(tmp_path / "cache", "another encoder").get(PROMPTS[0]) is None
    code = ("import sys, torch; from framecast.models.umt5 import PromptCache; "
            "c = PromptCache(sys.argv[1], sys.argv[2]); torch.save(torch.stack([c.get(p) for p in sys.argv[3:]]), "
            "sys.argv[1] + '/out.pt')")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "cache"), enc.encoder_id, *PROMPTS], check=True, env=env)
    assert torch.equal(torch.load(tmp_path / "cache" / "out.pt", weights_only=True), x[:3])
    blank = PromptCache(tmp_path / "hash", "hash")  # all-zero states (hash encoder, "") store no rows
    hashed = HashTextEncoder(8, 5).encode(["", "a b"])
    assert torch.equal(blank.encode_cached(["", "a b"], HashTextEncoder(8, 5)), hashed)
    assert torch.equal(PromptCache(tmp_path / "hash", "hash").get(""), torch.zeros(5, 8))
    cache.path(PROMPTS[0]).write_bytes(b"not a safetensors file")
    with pytest.raises(DataError, match="unreadable prompt-cache entry"):
        cache.get(PROMPTS[0])


def test_key_table_round_trips_and_covers_the_model():
    sd = tiny_umt5_model(0).state_dict()
    original = to_original(sd)
    assert set(original) == set(key_table(2)) and "blocks.1.pos_embedding.embedding.weight" in original
    back = to_transformers(original, 2)
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)


def one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


def test_partial_foreign_and_malicious_files_are_one_checkpoint_error(roots, tmp_path):
    good = torch.load(roots[1], weights_only=True)
    partial = tmp_path / "partial" / ORIGINAL_FILE
    partial.parent.mkdir()
    (partial.parent / "config.json").write_text(json.dumps(tiny_umt5_config()))
    torch.save({k: v for k, v in good.items() if k != "blocks.1.attn.k.weight"}, partial)
    with pytest.raises(CheckpointError) as e:
        load_umt5(partial, tokenizer=roots[0] / "tokenizer")
    assert "partial" in one_line(e) and ORIGINAL_FILE in one_line(e) and "blocks.1.attn.k.weight" in one_line(e)
    torch.save({"patch_embedding.weight": torch.zeros(2), "blocks.0.self_attn.q.weight": torch.zeros(2)}, partial)
    with pytest.raises(CheckpointError, match=r"unexpected keys \['blocks.0.self_attn.q.weight'") as e:
        load_umt5(partial, tokenizer=roots[0] / "tokenizer")
    one_line(e)
    torch.save(good, partial)
    with pytest.raises(CheckpointError, match="no umT5 tokenizer") as e:  # no google/umt5-xxl/ beside it
        load_umt5(partial)
    one_line(e)
    torch.save(torch.zeros(3), partial)
    with pytest.raises(CheckpointError, match="flat dict of tensors"):
        load_umt5(partial, tokenizer=roots[0] / "tokenizer")




def test_a_pickle_with_code_is_refused_without_running_it(tmp_path):
    marker, path = tmp_path / "ran", tmp_path / ORIGINAL_FILE
    torch.save({"token_embedding.weight": torch.zeros(2), "x": RunsCode(marker)}, path)
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="not a loadable") as e:
        load_umt5(path)
    one_line(e)
    assert not marker.exists()


def test_transformers_folder_missing_tensor_and_wrong_config(roots, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = write_transformers_text_encoder(tmp_path / "broken", 0) / "text_encoder"
    sd = load_file(folder / "model.safetensors")
    del sd["encoder.block.0.layer.1.DenseReluDense.wo.weight"]
    save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"missing keys \['encoder.block.0.layer.1.DenseReluDense.wo") as e:
        load_umt5(folder)
    assert str(folder) in one_line(e)
    (folder / "config.json").write_text(json.dumps({"model_type": "t5"}))
    with pytest.raises(CheckpointError, match="not a umt5 config"):
        load_umt5(folder)
    with pytest.raises(CheckpointError, match="no such umT5"):
        load_umt5(tmp_path / "nowhere")


def test_wan_root_dit_config_is_skipped_and_shapes_are_checked(roots, tmp_path):
    pth = tmp_path / "wanroot" / ORIGINAL_FILE
    pth.parent.mkdir()
    pth.write_bytes(roots[1].read_bytes())
    (pth.parent / "config.json").write_text(json.dumps({"model_type": "t2v", "dim": 1536}))  # the DiT's
    with pytest.raises(CheckpointError, match="config's 24 layers \\(the file has 2\\)") as e:  # umT5-XXL
        load_umt5(pth, tokenizer=roots[0] / "tokenizer")
    one_line(e)
    wide = dict(tiny_umt5_config(), d_model=64)
    with pytest.raises(CheckpointError, match="does not fit its config") as e:
        load_umt5(pth, tokenizer=roots[0] / "tokenizer", config=wide)
    one_line(e)
    enc = load_umt5(pth, tokenizer=roots[0] / "tokenizer", config=tiny_umt5_config(), max_tokens=T)
    assert torch.equal(enc.encode(PROMPTS), load_umt5(roots[0], max_tokens=T).encode(PROMPTS))


def test_build_text_encoder_umt5(roots):
    enc = build_text_encoder("umt5", 32, T, source=str(roots[0]))
    assert enc.encode(PROMPTS).shape == (3, T, 32) and enc.max_tokens == T
    for source in (None, ""):
        with pytest.raises(ConfigError, match="needs its weights"):
            build_text_encoder("umt5", 32, T, source=source)
    with pytest.raises(ConfigError, match=r"32-d states but model.text_dim is 64"):
        build_text_encoder("umt5", 64, T, source=roots[1])
    assert build_text_encoder("hash", 8, 4, 0).encode(["a"]).shape == (1, 4, 8)  # old callers unchanged
