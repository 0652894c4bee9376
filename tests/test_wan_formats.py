"""Every Wan transformer format a user holds loads through framecast.models.wan (architecture.md §5): tiny random
checkpoints in the diffusers, original (sharded), official CF (.pt with generator_ema and FSDP prefixes) and
framecast layouts give bit-identical forwards; the original -> diffusers renames agree with diffusers' own
single-file converter to the last bit; every broken or foreign file is one one-line CheckpointError; inspect
reports a checkpoint from headers / mmap alone; the sampling presets give the exact few-step sigmas."""

import shutil
from pathlib import Path

import pytest
import torch
from diffusers import WanTransformer3DModel
from safetensors.torch import load_file, save_file

from framecast import config as C
from framecast import flow
from framecast.errors import CheckpointError, ConfigError
from framecast.generate import load
from framecast.models import wan
from framecast.models.transformer import build_transformer

from .conftest import RunsCode
from .wan_tiny import (
    tiny_transformer_config,
    write_diffusers_root,
    write_framecast_checkpoint,
    write_official_pt,
    write_original_folder,
)

OFFICIAL = "causal-forcing++/framewise-2step.pt"  # the released CF++ file name: the preset is read from it


@pytest.fixture(autouse=True)
def torch_load_is_safe(monkeypatch):
    """Every torch.load in these tests must be weights_only (and mmap'd for zip files)."""
    real = torch.load

    def checked(f, *args, **kw):
        assert kw.get("weights_only") is True and kw.get("mmap") is True, kw
        return real(f, *args, **kw)

    monkeypatch.setattr(torch, "load", checked)


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """One tiny model (weights sd) in every format; the non-EMA copies hold other weights (sd + 1)."""
    root = tmp_path_factory.mktemp("wan")
    sd = write_diffusers_root(root / "diffusers", seed=0)
    other = {k: v + 1 for k, v in sd.items()}
    write_original_folder(root / "original", sd, shards=2)
    write_original_folder(root / "single", sd, shards=1)
    write_official_pt(root / OFFICIAL, sd, generator_sd=other)
    write_framecast_checkpoint(root / "framecast" / "ckpt", other, ema_sd=sd)
    return root, sd, other


def forward(net) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x, sigma = torch.randn(1, 2, 4, 4, 4, generator=g), torch.rand(1, 2, generator=g)  # [B, F, C, H, W], [B, F]
    text = torch.randn(1, 3, 32, generator=g)
    with torch.no_grad():
        return net(x, sigma, text)


def error(fn, *args, **kw) -> str:
    """The message of the one CheckpointError `fn` raises; it is one line."""
    with pytest.raises(CheckpointError) as e:
        fn(*args, **kw)
    assert len(str(e.value).splitlines()) == 1, str(e.value)
    return str(e.value)


def test_every_format_loads_to_identical_outputs(tree):
    root, sd, other = tree
    ref = forward(wan.load_transformer(root / "diffusers")[0])
    cases = {"diffusers": "diffusers", "diffusers/transformer": "diffusers", "original": "original",
             "single": "original", "single/diffusion_pytorch_model.safetensors": "original", OFFICIAL: "official",
             "framecast": "framecast", "framecast/ckpt": "framecast"}
    for rel, fmt in cases.items():
        assert wan.detect(root / rel) == fmt
        net, info = wan.load_transformer(root / rel, base=root / "original")
        assert info["format"] == fmt and torch.equal(forward(net), ref), rel
        assert all(torch.equal(v, sd[k]) for k, v in net.state_dict().items())
    info = wan.load_transformer(root / OFFICIAL, base=root / "diffusers")[1]
    assert info["key"] == "generator_ema" and info["wrappers"] == ["model.", "_fsdp_wrapped_module."]
    assert info["preset"] == "framewise-2step" and info["params"] == sum(v.numel() for v in sd.values())
    # the non-EMA weights when asked for (official: generator, framecast: model)
    for rel, key in ((OFFICIAL, "generator"), ("framecast", "model")):
        net, info = wan.load_transformer(root / rel, base=root / "diffusers", use_ema=False)
        assert info["key"] == key and all(torch.equal(v, other[k]) for k, v in net.state_dict().items())


def test_framecast_checkpoint_is_one_generate_load_reads(tree):
    root, sd, _ = tree
    m = load(root / "framecast")
    assert all(torch.equal(v, sd[k]) for k, v in m.denoiser.net.state_dict().items())
    assert m.spec == wan.load_transformer(root / "framecast")[1]["spec"] and m.spec.block_size == 1
    assert m.sample_latents(["a prompt"], num_frames=2).shape == (1, 2, 4, 4, 4)


def original_names(num_layers: int) -> set[str]:
    """The original Wan2.1 T2V parameter names, spelled out independently of the rename table."""
    block = [f"{attn}.{p}.{wb}" for attn in ("self_attn", "cross_attn") for p in "qkvo" for wb in ("weight", "bias")]
    block += [f"{attn}.norm_{p}.weight" for attn in ("self_attn", "cross_attn") for p in "qk"]
    block += [f"{m}.{wb}" for m in ("norm3", "ffn.0", "ffn.2") for wb in ("weight", "bias")] + ["modulation"]
    top = [f"{m}.{wb}" for m in ("patch_embedding", "text_embedding.0", "text_embedding.2", "time_embedding.0",
                                  "time_embedding.2", "time_projection.1", "head.head") for wb in ("weight", "bias")]
    return {*top, "head.modulation", *(f"blocks.{i}.{k}" for i in range(num_layers) for k in block)}


def test_conversion_matches_diffusers_single_file_to_the_last_bit(tree):
    root, _, _ = tree
    file = root / "single" / "diffusion_pytorch_model.safetensors"
    assert set(load_file(str(file))) == original_names(tiny_transformer_config()["num_layers"])  # real names
    oracle = WanTransformer3DModel.from_single_file(str(file), config=str(root / "diffusers"), subfolder="transformer",
                                                    local_files_only=True).state_dict()
    ours = wan.original_to_diffusers(load_file(str(file)))
    loaded = wan.load_transformer(root / "single")[0].state_dict()
    assert ours.keys() == oracle.keys() == loaded.keys()
    assert all(torch.equal(ours[k], oracle[k]) and torch.equal(loaded[k], oracle[k]) for k in oracle)


def test_rename_table_inverts_and_wrappers_strip():
    assert wan.original_to_diffusers({"blocks.3.norm3.weight": 0})["blocks.3.norm2.weight"] == 0
    assert wan.diffusers_to_original({"blocks.3.norm2.bias": 0}) == {"blocks.3.norm3.bias": 0}
    assert wan.diffusers_to_original({"scale_shift_table": 0, "blocks.0.scale_shift_table": 1}) == \
        {"head.modulation": 0, "blocks.0.modulation": 1}
    sd = {k: 0 for k in build_transformer(wan.model_config(tiny_transformer_config()), device="meta").state_dict()}
    assert wan.original_to_diffusers(wan.diffusers_to_original(sd)) == sd
    keys = {"model._fsdp_wrapped_module.blocks.0.ffn.0.weight": 0, "base_model.model._orig_mod.head.head.bias": 1,
            "_checkpoint_wrapped_module.patch_embedding.weight": 2}
    assert wan.strip_wrappers(keys) == {"blocks.0.ffn.0.weight": 0, "head.head.bias": 1, "patch_embedding.weight": 2}
    assert wan.wrappers_in(keys) == ["model.", "_fsdp_wrapped_module.", "base_model.model.", "_orig_mod.",
                                     "_checkpoint_wrapped_module."]
    assert "become" in error(wan.strip_wrappers, {"model.x": 0, "x": 1})


def test_sharded_bf16_original_loads_and_inspects(tree, tmp_path):
    root, sd, _ = tree
    write_original_folder(tmp_path / "bf16", sd, shards=3, dtype=torch.bfloat16)
    net, info = wan.load_transformer(tmp_path / "bf16")
    assert info["dtypes"] == ["bfloat16"] and next(net.parameters()).dtype == torch.float32
    assert all(torch.equal(v, sd[k].bfloat16().float()) for k, v in net.state_dict().items())
    assert wan.inspect(tmp_path / "bf16")["dtypes"] == ["bfloat16"]


def test_broken_and_foreign_files_are_one_clear_error(tree, tmp_path):
    root, sd, _ = tree
    shutil.copytree(root / "original", tmp_path / "truncated")
    shard = sorted((tmp_path / "truncated").glob("*-00001-of-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    msg = error(wan.load_transformer, tmp_path / "truncated")
    assert "original" in msg and "truncated" in msg and shard.name in msg
    # a VAE's tensors in an original folder: every key named, the foreign kind guessed
    write_original_folder(tmp_path / "vae", sd, shards=1)
    save_file({"decoder.middle.0.residual.0.gamma": torch.ones(4), "encoder.conv1.weight": torch.ones(2)},
              str(tmp_path / "vae" / "diffusion_pytorch_model.safetensors"))
    msg = error(wan.load_transformer, tmp_path / "vae")
    assert "original" in msg and "missing (" in msg and "2 unexpected" in msg and "VAE" in msg
    torch.save({"state_dict": {"w": torch.ones(1)}, "step": 3}, tmp_path / "random.pt")
    assert "not an official checkpoint" in error(wan.load_transformer, tmp_path / "random.pt")
    # one tensor missing: official (wrappers stripped, then strict) and diffusers
    write_official_pt(tmp_path / "partial.pt", sd, drop=("blocks.1.cross_attn.k.weight",))
    msg = error(wan.load_transformer, tmp_path / "partial.pt", base=root / "diffusers")
    assert "official" in msg and "1 missing (blocks.1.attn2.to_k.weight)" in msg
    shutil.copytree(root / "diffusers", tmp_path / "dpartial")
    weights = tmp_path / "dpartial" / "transformer" / "diffusion_pytorch_model.safetensors"
    save_file({k: v for k, v in load_file(str(weights)).items() if k != "proj_out.bias"}, str(weights))
    assert "diffusers" in (msg := error(wan.load_transformer, tmp_path / "dpartial")) and "proj_out.bias" in msg




def test_a_pickle_with_code_is_refused_and_never_run(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"generator": RunsCode(marker)}, tmp_path / "model.pt")
    for fn in (wan.detect, wan.inspect, wan.load_transformer):
        msg = error(fn, tmp_path)
        assert "official" in msg and "holds code" in msg and "system" in msg
    assert not marker.exists()


def test_ema_requests_and_missing_config(tree, tmp_path):
    root, sd, _ = tree
    write_official_pt(tmp_path / "noema.pt", sd, ema=False)
    msg = error(wan.load_transformer, tmp_path / "noema.pt", base=root / "diffusers", use_ema=True)
    assert "official" in msg and "no EMA" in msg and "generator" in msg
    assert wan.load_transformer(tmp_path / "noema.pt", base=root / "diffusers")[1]["key"] == "generator"
    write_framecast_checkpoint(tmp_path / "fc", sd)
    assert "framecast" in (msg := error(wan.load_transformer, tmp_path / "fc", use_ema=True)) and "no EMA" in msg
    assert "diffusers" in error(wan.load_transformer, root / "diffusers", use_ema=True)
    assert "base=" in error(wan.load_transformer, root / OFFICIAL)
    (tmp_path / "empty").mkdir()
    assert "not a Wan checkpoint" in error(wan.detect, tmp_path / "empty")
    assert "does not exist" in error(wan.detect, tmp_path / "nowhere")


def test_inspect_reads_headers_only(tree, tmp_path):
    root, sd, _ = tree
    params = sum(v.numel() for v in sd.values())
    for rel, fmt in (("diffusers", "diffusers"), ("original", "original"), (OFFICIAL, "official"),
                     ("framecast", "framecast")):
        info = wan.inspect(root / rel)
        assert (info["format"], info["params"], info["dtypes"], info["truncated"]) == (fmt, params, ["float32"], [])
        assert wan.format_inspect(info).startswith(f"format       {fmt}")
    official = wan.inspect(root / OFFICIAL)
    assert official["keys"] == ["generator_ema", "generator"] and official["key"] == "generator_ema"
    assert official["wrappers"] == ["model.", "_fsdp_wrapped_module."] and official["preset"] == "framewise-2step"
    assert wan.inspect(root / "framecast")["spec"].sigmas == tuple(flow.few_step_sigmas([1000, 500], 5.0).tolist())
    # the tensor data of a file is never read: with half of it cut off, inspect still counts every parameter
    write_original_folder(tmp_path / "cut", sd, shards=1)
    file = tmp_path / "cut" / "diffusion_pytorch_model.safetensors"
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    info = wan.inspect(tmp_path / "cut")
    assert info["params"] == params and info["truncated"] == [str(file)]
    assert "WARNING" in wan.format_inspect(info)


def test_components_are_found_for_the_other_loaders(tmp_path):
    def vae(folder: Path) -> None:
        (folder / "config.json").write_text("{}")

    write_diffusers_root(tmp_path / "d", components={"vae": ("diffusers", "AutoencoderKLWan", vae)})
    comps = wan.components(tmp_path / "d")
    assert comps["vae"] == str(tmp_path / "d" / "vae") and comps["text_encoder"] is None
    folder = write_original_folder(tmp_path / "o", write_diffusers_root(tmp_path / "d2"), shards=1)
    for name in ("Wan2.1_VAE.pth", "models_t5_umt5-xxl-enc-bf16.pth", "google/umt5-xxl/spiece.model"):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(b"")
    comps = wan.components(folder)
    assert comps["vae"].endswith("Wan2.1_VAE.pth") and comps["text_encoder"].endswith("bf16.pth")
    assert comps["tokenizer"] == str(folder / "google" / "umt5-xxl")


def test_model_configs_from_every_layout(tree):
    root, sd, _ = tree
    mc = wan.model_config(root / "diffusers")
    assert wan.model_config(root / "original") == mc == wan.model_config(root / "framecast")
    assert (mc.num_heads, mc.head_dim, mc.in_channels, mc.text_dim, mc.patch_size) == (2, 16, 4, 32, (1, 2, 2))
    # the released 1.3B config.json maps onto the preset of that size
    released = {"_class_name": "WanModel", "dim": 1536, "eps": 1e-06, "ffn_dim": 8960, "freq_dim": 256, "in_dim": 16,
                "model_type": "t2v", "num_heads": 12, "num_layers": 30, "out_dim": 16, "text_len": 512}
    big = wan.model_config(released, codec="identity")
    assert big.preset == "wan2.1-1.3b" and big == C.model_preset("wan2.1-1.3b")
    assert "unsupported" in error(wan.model_config, {**released, "model_type": "i2v"})
    assert "lacks" in error(wan.model_config, {"_class_name": "WanModel", "dim": 64})


def test_sampling_presets():
    shapes = dict(latent_shape=(16, 6, 10), pixel_shape=(3, 48, 80), num_frames=5, codec="identity",
                  text_encoder="hash", text_tokens=4)
    four = tuple(flow.few_step_sigmas([1000, 750, 500, 250], 5.0).tolist())
    for name, block, sigmas, first in (("framewise-1step", 1, [1000], four), ("framewise-2step", 1, [1000, 500], four),
                                       ("framewise-4step", 1, [1000, 750, 500, 250], None),
                                       ("chunkwise-4step", 3, [1000, 750, 500, 250], None)):
        spec = wan.preset_spec(name, **shapes, window=4)
        assert spec.few_step and spec.causal and spec.block_size == block and spec.guidance == 1.0
        assert spec.sigmas == tuple(flow.few_step_sigmas(sigmas, 5.0).tolist()) and spec.first_sigmas == first
        assert spec.schedule().sampler == "few_step" and spec.window == 4 and spec.from_json(spec.to_json()) == spec
    base = wan.preset_spec("bidirectional-euler", **shapes)
    assert (base.causal, base.sampler, base.steps, base.guidance, base.shift) == (False, "euler", 50, 5.0, 5.0)
    with pytest.raises(ConfigError):
        wan.preset_spec("nope", **shapes)
