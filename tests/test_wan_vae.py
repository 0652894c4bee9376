"""The Wan VAE codec (framecast/models/wan_vae.py) on a tiny AutoencoderKLWan with random weights: streaming
decode equals the whole-clip decode exactly, streams interleave on one VAE, encode takes 1 + 4k frames to 1 + k
normalised posterior means, framecast's original -> diffusers conversion equals diffusers' own
`from_single_file` bit for bit, and bad files are one CheckpointError each."""

import itertools

import pytest
import torch

pytest.importorskip("diffusers")

from framecast.errors import CheckpointError, ConfigError
from framecast.models import wan_vae as W
from framecast.models.codecs import IdentityCodec, build_codec

from .conftest import RunsCode
from .wan_tiny_vae import TINY_VAE, tiny_vae, write_tiny_vae

H = W_ = 16  # pixels; latents are 2 x 2


@pytest.fixture(scope="module")
def codec():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convolutions: threads only add synchronisation (tests/conftest.py)
    yield W.WanVAECodec(tiny_vae())
    torch.set_num_threads(n)


def latents(frames: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(2, frames, 4, H // 8, W_ // 8, generator=torch.Generator().manual_seed(seed))  # [B, F', z, h, w]


def stream(codec, z: torch.Tensor, sizes: list[int]) -> tuple[torch.Tensor, list[int]]:
    dec, out, i = codec.decoder(), [], 0
    for k in sizes:
        out.append(dec.step(z[:, i: i + k]))  # [B, f, 3, H, W]
        i += k
    return torch.cat(out, 1), [o.shape[1] for o in out]


ROUNDING = 2e-5  # bounds float32 summation-order differences of a [-1, 1] decode, and nothing more

@pytest.mark.parametrize("frames,chunkings", [(1, [[1]]), (2, [[1, 1], [2], [1, 0, 1]]),
                                              (5, [[1] * 5, [1, 2, 2], [5], [2, 3]])])
@torch.no_grad()
def test_streaming_decode_equals_whole_clip_decode(codec, frames, chunkings):
    z = latents(frames)
    whole = codec.decode(z)  # diffusers' own decode: [B, 1 + 4(F' - 1), 3, H, W]
    assert whole.shape == (2, codec.pixel_frames(frames), 3, H, W_) and 0 < whole.abs().max() <= 1
    for sizes in chunkings:
        got, counts = stream(codec, z, sizes)
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        assert counts == [sum(1 if f == 0 else 4 for f in range(s, s + k)) for s, k in zip(starts, sizes)]
        # the same ops in order; bitwise on most CPUs, but oneDNN may pick a conv kernel by input length and ISA
        # (2.8e-6 seen on one machine of this kind), so the bound is float32 rounding
        torch.testing.assert_close(got, whole, rtol=0, atol=ROUNDING, msg=lambda m: f"{sizes}: {m}")


@torch.no_grad()
def test_interleaved_streams_on_one_vae_equal_their_own_decodes(codec):
    za, zb = latents(5, seed=1), latents(5, seed=2)
    want_a, want_b = codec.decode(za), codec.decode(zb)
    da, db, got_a, got_b = codec.decoder(), codec.decoder(), [], []
    spans_a, spans_b = [(0, 1), (1, 3), (3, 5)], [(0, 1), (1, 2), (2, 3), (3, 5)]  # latent frames per step
    for a, b in itertools.zip_longest(spans_a, spans_b):  # a0 b0 a1 b1 a2 b2 b3 on the one VAE
        if a:
            got_a.append(da.step(za[:, a[0]: a[1]]))
        codec.decode(latents(2, seed=9))  # whole-clip calls in between clear the VAE's own cache, not a stream's
        codec.encode(torch.zeros(2, 5, 3, H, W_))
        got_b.append(db.step(zb[:, b[0]: b[1]]))
    torch.testing.assert_close(torch.cat(got_a, 1), want_a, rtol=0, atol=ROUNDING)  # see the test above
    torch.testing.assert_close(torch.cat(got_b, 1), want_b, rtol=0, atol=ROUNDING)
    with pytest.raises(ValueError, match="batch and size"):
        da.step(za[:1, :1])


@torch.no_grad()
def test_encode_gives_normalised_posterior_means(codec):
    vae = codec.vae
    mean, std = (torch.tensor(TINY_VAE[k]).view(1, 1, -1, 1, 1) for k in ("latents_mean", "latents_std"))
    for k in (0, 1, 2):
        x = torch.rand(2, 1 + 4 * k, 3, H, W_, generator=torch.Generator().manual_seed(k)) * 2 - 1  # pixels
        z = codec.encode(x)  # [B, 1 + k, z, h, w]
        assert z.shape == (2, 1 + k, 4, H // 8, W_ // 8)
        assert z.shape[1:] == (codec.latent_frames(1 + 4 * k), *codec.latent_shape((3, H, W_)))
        mode = vae.encode(x.permute(0, 2, 1, 3, 4)).latent_dist.mode().permute(0, 2, 1, 3, 4)  # diffusers' own
        assert torch.equal(z, (mode - mean) / std)
        assert codec.decode(z).shape == x.shape and codec.pixel_frames(1 + k) == 1 + 4 * k
    for bad in (0, 2, 4, 8):
        with pytest.raises(ConfigError, match=r"1 \+ 4k pixel frames"):
            codec.encode(torch.zeros(1, bad, 3, H, W_))
    with pytest.raises(ConfigError, match="multiples of 8"):
        codec.latent_shape((3, 12, 16))
    got = (codec.name, codec.latent_channels, codec.pixel_channels, codec.temporal, codec.spatial)
    assert got == ("wan_vae", 4, 3, 4, 8)  # factors derived from the config: (4, 8, 8) as in Wan2.1


def test_conversion_equals_diffusers_from_single_file(tmp_path):
    from diffusers import AutoencoderKLWan

    vae_dir = write_tiny_vae(tmp_path / "diffusers")  # the oracle's config folder and the reference weights
    pth = write_tiny_vae(tmp_path / "original", original=True)
    ref = tiny_vae().state_dict()
    cfg = W.vae_config(TINY_VAE)
    original = W.to_original(ref, cfg)
    back, unknown = W.to_diffusers(original, cfg)  # the table and its inverse: a bijection on every key
    assert W.ORIGINAL_MARKER in original and not set(original) & {k for k in ref if ".mid_block." in k}
    assert unknown == [] and list(back) == list(ref) and all(back[k] is ref[k] for k in ref)
    theirs = AutoencoderKLWan.from_single_file(str(pth), config=str(vae_dir), local_files_only=True).state_dict()
    for source, kw in ((pth, {"config": vae_dir}), (pth.parent, {}), (vae_dir, {}), (vae_dir.parent, {})):
        ours = W.load_wan_vae(source, **kw).vae.state_dict()
        assert ours.keys() == theirs.keys() == ref.keys()
        assert all(torch.equal(ours[k], theirs[k]) and torch.equal(ours[k], ref[k]) for k in ref), source
    assert isinstance(build_codec("wan_vae", 4, pth.parent), W.WanVAECodec)
    assert all(isinstance(build_codec("identity", 3, *src), IdentityCodec) for src in ((), ("",), ("ignored",)))
    with pytest.raises(ConfigError, match="model.codec_source"):
        build_codec("wan_vae", 4)
    with pytest.raises(ConfigError, match="model.in_channels is 16"):
        build_codec("wan_vae", 16, vae_dir)




def test_bad_files_are_one_checkpoint_error(tmp_path):
    pth = write_tiny_vae(tmp_path / "ok", original=True)
    cfg = W.vae_config(TINY_VAE)
    state = torch.load(pth, weights_only=True)
    cut = tmp_path / "truncated.pth"
    cut.write_bytes(pth.read_bytes()[: pth.stat().st_size // 2])
    marker = tmp_path / "pwned"
    torch.save({"conv1.weight": RunsCode(marker)}, tmp_path / "code.pth")
    dropped = "decoder.upsamples.4.shortcut.weight"  # the one shortcut of the decoder (original name)
    torch.save({k: v for k, v in state.items() if k != dropped}, tmp_path / "partial.pth")
    torch.save({"patch_embedding.weight": torch.zeros(2, 2), "blocks.0.self_attn.q.weight": torch.zeros(2, 2),
                "head.modulation": torch.zeros(1, 2, 2)}, tmp_path / "transformer.pth")
    cases = {"truncated.pth": "cannot be read", "code.pth": "cannot be read", "transformer.pth": "not a Wan VAE",
             "partial.pth": rf"missing \[{dropped}\]"}
    for name, msg in cases.items():
        with pytest.raises(CheckpointError, match=msg) as e:
            W.load_wan_vae(tmp_path / name, config=cfg)
        assert name in str(e.value) and len(str(e.value).splitlines()) == 1
    assert not marker.exists()  # weights_only: the pickled os.system never ran
    (tmp_path / "alone.pth").write_bytes(pth.read_bytes())  # no vae_config.json beside it: the Wan2.1 config
    with pytest.raises(CheckpointError, match=r"original Wan2.1 VAE .*wrong shapes \[encoder.conv1.weight \(8, 3"):
        W.load_wan_vae(tmp_path / "alone.pth")
    bad_dir = write_tiny_vae(tmp_path / "partial_diffusers")  # diffusers itself only warns and leaves it empty
    from safetensors.torch import load_file, save_file

    weights = load_file(bad_dir / "diffusion_pytorch_model.safetensors")
    del weights["decoder.conv_out.weight"]
    save_file(weights, bad_dir / "diffusion_pytorch_model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing_keys \[decoder.conv_out.weight\]"):
        W.load_wan_vae(tmp_path / "partial_diffusers")
    with pytest.raises(CheckpointError, match="holds no Wan VAE"):
        W.load_wan_vae(tmp_path)
