"""The Wan2.1 VAE (arXiv 2503.20314) as a framecast codec (architecture.md §6): pixels [B, 1 + 4k, 3, H, W]
in [-1, 1] <-> latents [B, 1 + k, 16, H/8, W/8]. `load_wan_vae(path)` takes a diffusers root, its vae/ folder
or an original Wan2.1_VAE.pth (read with weights_only=True, renamed with the declared table below and loaded
strictly; diffusers folders are checked for the missing keys diffusers itself only warns about).

Latents are the posterior MEAN (deterministic), normalised per channel: `(z - mean) / std` with the config's
`latents_mean` / `latents_std`. Temporal factor 2 ** (True entries of `temperal_downsample`), spatial factor
2 ** (len(dim_mult) - 1) (architecture.md §3). Each causal 3-D convolution reads its input's last frames
from a feature cache, which diffusers' `decode` keeps on the VAE instance; each stream decoder here owns its
cache (passed to the decoder module as `feat_cache`: the first latent frame gives 1 pixel frame, each later
one 4) and `encode` uses a fresh one, so streams interleave on one VAE. Tiling is off; diffusers is imported
lazily.
"""

from __future__ import annotations

import contextlib
import inspect
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..errors import CheckpointError, ConfigError
from ..schema import read_json

if TYPE_CHECKING:
    from diffusers import AutoencoderKLWan

Tensor = torch.Tensor

ORIGINAL_FILE = "Wan2.1_VAE.pth"
SIDECAR_CONFIG = "vae_config.json"  # framecast's: the AutoencoderKLWan config of an original file beside it
ORIGINAL_MARKER = "decoder.middle.0.residual.0.gamma"
DIFFUSERS_MARKER = "decoder.mid_block.resnets.0.norm1.gamma"

# The Wan2.1 VAE (all Wan2.1 models share it): 127M parameters, z_dim 16, stride (4, 8, 8)
WAN21_VAE_CONFIG: dict[str, Any] = {
    "base_dim": 96, "z_dim": 16, "dim_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_scales": [], "dropout": 0.0,
    "temperal_downsample": [False, True, True],
    "latents_mean": [-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                     0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921],
    "latents_std": [2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160],
}

# -- the rename table: original module path -> diffusers module path -----------------------------------

# modules whose place does not depend on the config
FIXED_RENAMES: dict[str, str] = {
    "conv1": "quant_conv", "conv2": "post_quant_conv",
    **{f"{side}.{a}": f"{side}.{b}" for side in ("encoder", "decoder") for a, b in (
        ("conv1", "conv_in"), ("head.0", "norm_out"), ("head.2", "conv_out"),
        ("middle.0", "mid_block.resnets.0"), ("middle.1", "mid_block.attentions.0"),
        ("middle.2", "mid_block.resnets.1"))},
}
# parameters inside a residual block (the original's nn.Sequential indices -> named layers)
RESIDUAL_RENAMES: dict[str, str] = {"residual.0": "norm1", "residual.2": "conv1", "residual.3": "norm2",
                                    "residual.6": "conv2", "shortcut": "conv_shortcut"}


def rename_table(config: dict[str, Any]) -> dict[str, str]:
    """Original -> diffusers module paths of a VAE of `config`. The encoder's flat `downsamples` list keeps
    its indices (`down_blocks`); the decoder's flat `upsamples` list (per stage num_res_blocks + 1 residual
    blocks, then a resampler except after the last stage) is grouped into `up_blocks.i.{resnets.j, upsamplers.0}`."""
    table = dict(FIXED_RENAMES)
    stages, per_stage = len(config["dim_mult"]), int(config["num_res_blocks"])
    attn = config.get("attn_scales", [])  # encoder: residual blocks (+ attention at attn_scales), a downsampler
    n = sum(per_stage * (1 + (0.5 ** i in attn)) + (i != stages - 1) for i in range(stages))
    table |= {f"encoder.downsamples.{k}": f"encoder.down_blocks.{k}" for k in range(n)}
    n = 0
    for i in range(stages):
        for j in range(per_stage + 1):
            table[f"decoder.upsamples.{n}"], n = f"decoder.up_blocks.{i}.resnets.{j}", n + 1
        if i != stages - 1:
            table[f"decoder.upsamples.{n}"], n = f"decoder.up_blocks.{i}.upsamplers.0", n + 1
    return table


def _rename(key: str, modules: dict[str, str], parts: dict[str, str]) -> str | None:
    """`key` with its longest module prefix in `modules` and a leading residual part in `parts` renamed."""
    bits = key.split(".")
    for n in range(len(bits) - 1, 0, -1):
        head = ".".join(bits[:n])
        if head in modules:
            rest = bits[n:]
            for m in (2, 1):
                if len(rest) > m and ".".join(rest[:m]) in parts:
                    rest = parts[".".join(rest[:m])].split(".") + rest[m:]
                    break
            return ".".join([modules[head], *rest])
    return None


def to_diffusers(state: dict[str, Tensor], config: dict[str, Any]) -> tuple[dict[str, Tensor], list[str]]:
    """An original-layout state dict in diffusers names, and the original keys no rule covers."""
    table = rename_table(config)
    new = {k: _rename(k, table, RESIDUAL_RENAMES) for k in state}
    return {n: state[k] for k, n in new.items() if n is not None}, [k for k, n in new.items() if n is None]


def original_names(config: dict[str, Any]) -> Callable[[str], str]:
    """diffusers key -> original key for a VAE of `config`: the inverse of the table (keys it lacks stay)."""
    table, parts = {b: a for a, b in rename_table(config).items()}, {b: a for a, b in RESIDUAL_RENAMES.items()}
    return lambda key: _rename(key, table, parts) or key


def to_original(state: dict[str, Tensor], config: dict[str, Any]) -> dict[str, Tensor]:
    """The inverse of `to_diffusers` (tests write original-layout files with it)."""
    name = original_names(config)
    return {name(k): v for k, v in state.items()}


def _causal_convs(module: torch.nn.Module) -> int:
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d

    return sum(isinstance(m, WanCausalConv3d) for m in module.modules())


class WanVAECodec:
    """pixels [B, 1 + tk, 3, H, W] in [-1, 1] <-> normalised latents [B, 1 + k, z_dim, H/s, W/s]."""

    name = "wan_vae"
    pixel_channels = 3

    def __init__(self, vae: AutoencoderKLWan) -> None:
        c = vae.config
        if c.patch_size is not None or c.in_channels != 3 or c.out_channels != 3:
            raise ConfigError(f"the wan_vae codec takes the Wan2.1 VAE (RGB, patch_size None); this one has "
                              f"in/out channels {c.in_channels}/{c.out_channels}, patch_size {c.patch_size}")
        stages = len(c.dim_mult) - 1  # downsampling stages: the last stage keeps the resolution
        if len(c.temperal_downsample) != stages or not len(c.latents_mean) == len(c.latents_std) == c.z_dim:
            raise ConfigError(f"a Wan VAE config needs one temperal_downsample entry per downsampling stage ({stages} "
                              f"for dim_mult {list(c.dim_mult)}) and z_dim = {c.z_dim} latents_mean / latents_std")
        self.vae = vae.eval().requires_grad_(False)
        vae.disable_tiling()
        self.latent_channels = int(c.z_dim)
        self.temporal = 2 ** sum(bool(t) for t in c.temperal_downsample)
        self.spatial = 2 ** stages
        self.encoder_convs, self.decoder_convs = _causal_convs(vae.encoder), _causal_convs(vae.decoder)

    def _stats(self) -> tuple[Tensor, Tensor]:
        p = next(self.vae.parameters())
        return tuple(torch.tensor(v, device=p.device, dtype=p.dtype).view(1, -1, 1, 1, 1)  # [1, z, 1, 1, 1]
                     for v in (self.vae.config.latents_mean, self.vae.config.latents_std))

    @staticmethod
    def _check(x: Tensor, channels: int, what: str) -> None:
        if x.ndim != 5 or x.shape[2] != channels:
            raise ValueError(f"expected {what} [B, F, {channels}, H, W], got {tuple(x.shape)}")

    def encode(self, pixels: Tensor) -> Tensor:
        """pixels [B, 1 + tk, 3, H, W] -> normalised posterior means [B, 1 + k, z, H/s, W/s]."""
        self._check(pixels, 3, "pixels")
        n = self.latent_frames(pixels.shape[1])
        self.latent_shape(tuple(pixels.shape[2:]))  # raises on H, W not divisible by the spatial factor
        p, t = next(self.vae.parameters()), self.temporal
        x = pixels.to(p.device, p.dtype).permute(0, 2, 1, 3, 4)  # [B, 3, F, H, W]
        chunks = [x[:, :, :1]] + [x[:, :, 1 + t * i: 1 + t * (i + 1)] for i in range(n - 1)]  # 1, t, t, ...
        cache = [None] * self.encoder_convs
        h = torch.cat([self.vae.encoder(c, feat_cache=cache, feat_idx=[0]) for c in chunks], 2)  # [B, 2z, n, h, w]
        mu = self.vae.quant_conv(h)[:, : self.latent_channels]  # [B, z, n, h, w]: the posterior mean
        mean, std = self._stats()
        return ((mu - mean) / std).permute(0, 2, 1, 3, 4).to(pixels.device, pixels.dtype)  # [B, n, z, h, w]

    def unnormalise(self, latents: Tensor) -> Tensor:
        """Normalised latents [B, F, z, h, w] -> the VAE's latents [B, z, F, h, w] on its device and dtype."""
        self._check(latents, self.latent_channels, "latents")
        p = next(self.vae.parameters())
        mean, std = self._stats()
        return latents.to(p.device, p.dtype).permute(0, 2, 1, 3, 4) * std + mean  # [B, z, F, h, w]

    def decode(self, latents: Tensor) -> Tensor:
        if latents.ndim == 5 and latents.shape[1] == 0:
            return self.decoder().step(latents)
        x = self.vae.decode(self.unnormalise(latents)).sample  # [B, 3, 1 + t(F - 1), H, W] clamped
        return x.permute(0, 2, 1, 3, 4).to(latents.device, latents.dtype)  # [B, F_pix, 3, H, W]

    def decoder(self) -> WanStreamDecoder:
        return WanStreamDecoder(self)

    def latent_frames(self, pixel_frames: int) -> int:
        t = self.temporal
        if pixel_frames < 1 or (pixel_frames - 1) % t:
            raise ConfigError(f"the Wan VAE encodes 1 + {t}k pixel frames (temporal factor {t} from "
                              f"temperal_downsample); got {pixel_frames}")
        return 1 + (pixel_frames - 1) // t

    def pixel_frames(self, latent_frames: int) -> int:
        if latent_frames < 0:
            raise ConfigError(f"latent frame count must be >= 0, got {latent_frames}")
        return 0 if latent_frames == 0 else 1 + self.temporal * (latent_frames - 1)

    def latent_shape(self, pixel_shape: tuple[int, int, int]) -> tuple[int, int, int]:
        (c, h, w), s = pixel_shape, self.spatial
        if c != 3 or h % s or w % s or h < s or w < s:
            raise ConfigError(f"the Wan VAE takes RGB frames whose height and width are multiples of {s} "
                              f"(2 ** downsampling stages of dim_mult); got {tuple(pixel_shape)}")
        return self.latent_channels, h // s, w // s


class WanStreamDecoder:
    """One stream's latent frames in order, any number per call, through its own causal-conv cache: 1 pixel
    frame for the stream's first latent frame, `temporal` for each later one, equal to the whole-clip decode."""

    def __init__(self, codec: WanVAECodec) -> None:
        self.codec, self.cache, self.frames = codec, [None] * codec.decoder_convs, 0  # cache: this stream's
        self.shape: tuple[int, ...] | None = None  # (batch, h, w) of the stream, fixed by its first step

    def step(self, latents: Tensor) -> Tensor:
        vae, z = self.codec.vae, self.codec.unnormalise(latents)  # z: [B, z, k, h, w]
        shape = (z.shape[0], *z.shape[3:])
        if self.shape not in (None, shape):
            raise ValueError(f"this stream decodes latents of batch and size {self.shape}, got {shape}")
        self.shape = shape
        if z.shape[2] == 0:
            s = self.codec.spatial
            return latents.new_zeros(latents.shape[0], 0, 3, latents.shape[3] * s, latents.shape[4] * s)
        x = vae.post_quant_conv(z)  # [B, z, k, h, w]: a 1x1x1 convolution, frame by frame, no cache
        out = []
        for i in range(x.shape[2]):
            out.append(vae.decoder(x[:, :, i: i + 1], feat_cache=self.cache, feat_idx=[0],
                                   first_chunk=self.frames == 0))  # [B, 3, 1 or t, H, W]
            self.frames += 1
        pix = torch.cat(out, 2).clamp(-1, 1)  # [B, 3, f, H, W]
        return pix.permute(0, 2, 1, 3, 4).to(latents.device, latents.dtype)  # [B, f, 3, H, W]


def vae_config(override: str | Path | dict[str, Any] | None = None) -> dict[str, Any]:
    """The Wan2.1 VAE config with `override` (a dict, a config.json, a diffusers vae/ folder or root) on top."""
    cfg = {k: list(v) if isinstance(v, list) else v for k, v in WAN21_VAE_CONFIG.items()}
    if override is None:
        return cfg
    if not isinstance(override, dict):
        p = Path(override)
        if p.is_dir():
            p = p / "vae" / "config.json" if (p / "vae" / "config.json").is_file() else p / "config.json"
        override = read_json(p, "Wan VAE config", ConfigError)
        if not isinstance(override, dict):
            raise ConfigError(f"Wan VAE config {p} is not a JSON object")
    if override.get("_class_name", "AutoencoderKLWan") != "AutoencoderKLWan":
        raise ConfigError(f"the VAE config describes a {override['_class_name']}, not an AutoencoderKLWan")
    return cfg | {k: v for k, v in override.items() if not k.startswith("_")}


def build_vae(config: dict[str, Any], *, meta: bool = False) -> AutoencoderKLWan:
    """An AutoencoderKLWan of `config` (unknown keys refused), with random weights or on the meta device."""
    from diffusers import AutoencoderKLWan

    unknown = sorted(set(config) - set(inspect.signature(AutoencoderKLWan.__init__).parameters))
    if unknown:
        raise ConfigError(f"unknown AutoencoderKLWan config keys {unknown}")
    with torch.device("meta") if meta else contextlib.nullcontext():
        return AutoencoderKLWan(**config)


def _read_state(path: Path) -> dict[str, Tensor]:
    """A plain state dict of tensors from a .pth (weights_only: no code runs) or a .safetensors file."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a truncated, foreign or code-pickling file is one bad file
        msg = (f"{e.__class__.__name__}: {e}".strip().splitlines()[0] if not isinstance(e, pickle.UnpicklingError)
               else "it pickles objects other than tensors, which are never unpickled (weights_only=True)")
        raise CheckpointError(f"Wan VAE file {path} cannot be read as a state dict ({msg})") from None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"Wan VAE file {path} is not a plain state dict of tensors (a {type(state).__name__})")
    return state


def _first(keys: list[str], n: int = 5) -> str:
    return ", ".join(keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


def load_state(path: Path, config: dict[str, Any], dtype: torch.dtype) -> AutoencoderKLWan:
    """An original (or diffusers-layout) single VAE file, converted and loaded strictly."""
    state = _read_state(path)
    if ORIGINAL_MARKER in state:
        fmt, (state, unknown) = "original Wan2.1 VAE", to_diffusers(state, config)
    elif DIFFUSERS_MARKER in state:
        fmt, unknown = "diffusers AutoencoderKLWan", None
    else:
        raise CheckpointError(f"{path} is not a Wan VAE state dict: it has neither {ORIGINAL_MARKER!r} (original "
                              f"layout) nor {DIFFUSERS_MARKER!r} (diffusers); first keys: {_first(list(state))}")
    vae = build_vae(config, meta=True)
    want = vae.state_dict()
    own = original_names(config) if unknown is not None else str  # a key as the file names it
    shapes = [k for k in state if k in want and state[k].shape != want[k].shape]
    bad = {"missing": [own(k) for k in want if k not in state],
           "unexpected": (unknown or []) + [own(k) for k in state if k not in want],
           "wrong shapes": [f"{own(k)} {tuple(state[k].shape)} != {tuple(want[k].shape)}" for k in shapes]}
    if any(bad.values()):
        raise CheckpointError(f"{path} ({fmt} state dict) does not fit the AutoencoderKLWan config (z_dim "
                              f"{config['z_dim']}, base_dim {config['base_dim']}): "
                              + "; ".join(f"{k} [{_first(v, 3)}]" for k, v in bad.items() if v))
    vae.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True, assign=True)
    return vae


def load_folder(path: Path, dtype: torch.dtype) -> AutoencoderKLWan:
    """A diffusers vae/ folder through from_pretrained, refusing the partial loads diffusers only warns about."""
    from diffusers import AutoencoderKLWan

    cfg = read_json(path / "config.json", "Wan VAE config", CheckpointError)
    if (kind := cfg.get("_class_name") if isinstance(cfg, dict) else type(cfg).__name__) != "AutoencoderKLWan":
        raise CheckpointError(f"{path / 'config.json'} describes a {kind}, not a Wan VAE (AutoencoderKLWan)")
    try:
        vae, info = AutoencoderKLWan.from_pretrained(str(path), torch_dtype=dtype, local_files_only=True,
                                                     output_loading_info=True)
    except Exception as e:  # noqa: BLE001 - whatever diffusers raises on a bad folder
        msg = f"{e.__class__.__name__}: {e}".strip().splitlines()[0]
        raise CheckpointError(f"diffusers Wan VAE folder {path} cannot be loaded ({msg})") from None
    bad = {k: list(info.get(k) or []) for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")}
    if any(bad.values()):
        raise CheckpointError(f"diffusers Wan VAE folder {path} does not fit its config: "
                              + "; ".join(f"{k} [{_first([str(x) for x in v])}]" for k, v in bad.items() if v))
    return vae


def load_wan_vae(path: str | Path, *, config: str | Path | dict[str, Any] | None = None,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> WanVAECodec:
    """The Wan VAE codec from a diffusers `vae/` folder, a diffusers root holding `vae/`, an original folder
    holding `Wan2.1_VAE.pth`, or a single `.pth` / `.safetensors` file. `config` (single files only)
    overrides the Wan2.1 VAE config; without it a `vae_config.json` beside the file does."""
    path = Path(path)
    if path.is_dir():
        if (path / "vae" / "config.json").is_file():
            path = path / "vae"
        elif (path / ORIGINAL_FILE).is_file():
            path = path / ORIGINAL_FILE
        elif not (path / "config.json").is_file():
            raise CheckpointError(f"{path} holds no Wan VAE: expected a diffusers vae/ folder (config.json + "
                                  f"weights), a diffusers root with vae/, or {ORIGINAL_FILE}")
    if path.is_dir():
        if config is not None:
            raise ConfigError(f"{path} is a diffusers folder with its own config.json; `config` is for single files")
        vae = load_folder(path, dtype)
    elif path.is_file():
        if config is None and (path.parent / SIDECAR_CONFIG).is_file():
            config = path.parent / SIDECAR_CONFIG
        vae = load_state(path, vae_config(config), dtype)
    else:
        raise CheckpointError(f"Wan VAE {path} is missing")
    return WanVAECodec(vae.to(device))  # already in `dtype` (diffusers warns about casting with to())
