"""One loader for every Wan2.1 transformer a user holds (architecture.md §5, method.md §3.2): `detect` names the
format, `load_transformer` builds a `CausalWanTransformer` with strict key checks, `inspect` reads headers only.

* "framecast": `meta.json`, or a `latest` / `ckpt/latest` pointer to one (architecture.md §5).
* "diffusers": `model_index.json` + `transformer/`, or that folder alone (config `_class_name: WanTransformer3DModel`).
* "original": config `_class_name: WanModel` + `diffusion_pytorch_model.safetensors`, or shards + their index.
* "official": a CF / SF / CausVid `model.pt` (or its folder): a plain torch dict with `generator_ema` and/or
  `generator` (maybe `critic`) of original-named weights behind wrappers; it has no config, so it needs `base=`.

Wrapper prefixes are stripped (`strip_wrappers`), names mapped by the declared table `RENAMES`. Torch files are read
only with `weights_only=True` (mmap'd): a pickle with code is refused, never run. `components` is the VAE/umT5 hook.
"""

from __future__ import annotations

import functools
import json
import re
import struct
import zipfile
from pathlib import Path
from typing import Any

import torch
from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

from .. import config as C
from ..errors import CheckpointError, ConfigError
from ..schema import read_json
from ..spec import SamplingSpec, few_step_fields
from .transformer import CausalWanTransformer, build_transformer
from .weights import Lazy, of_tensor, open_safetensors, read_all

StateDict = dict[str, torch.Tensor]
WEIGHTS = "diffusion_pytorch_model"
INDEX = f"{WEIGHTS}.safetensors.index.json"
OFFICIAL_KEYS = ("generator_ema", "generator", "critic")

# (original, diffusers) by priority; rules match whole dotted segments ("^": at a key's start) in one pass, so the
# norm3 <-> norm2 swap needs no placeholder
RENAMES: list[tuple[str, str]] = [
    ("^time_embedding.0", "^condition_embedder.time_embedder.linear_1"),
    ("^time_embedding.2", "^condition_embedder.time_embedder.linear_2"),
    ("^text_embedding.0", "^condition_embedder.text_embedder.linear_1"),
    ("^text_embedding.2", "^condition_embedder.text_embedder.linear_2"),
    ("^time_projection.1", "^condition_embedder.time_proj"), ("^head.modulation", "^scale_shift_table"),
    ("^head.head", "^proj_out"), ("modulation", "scale_shift_table"), ("self_attn", "attn1"), ("cross_attn", "attn2"),
    ("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("o", "to_out.0"), ("ffn.0", "ffn.net.0.proj"), ("ffn.2", "ffn.net.2"),
    ("norm3", "norm2"), ("norm2", "norm3"),  # Wan's affine pre-cross-attention norm is diffusers' norm2
]
# stripped wherever they occur as segments: `model.` (CF/SF generators hold the net as `.model`), FSDP, activation
# checkpointing, torch.compile, peft, and the single-file `diffusion_model.`
WRAPPERS = ("base_model.model.", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.",
            "diffusion_model.", "model.")
# ModelConfig field <- (diffusers config.json argument, original config.json field; its head_dim is dim / num_heads),
# and WanModel's defaults for the fields original config files leave out
CONFIG_FIELDS = {"patch_size": ("patch_size",) * 2, "num_heads": ("num_attention_heads", "num_heads"),
                 "head_dim": ("attention_head_dim", "head_dim"), "in_channels": ("in_channels", "in_dim"),
                 "out_channels": ("out_channels", "out_dim"), "rope_max_seq_len": ("rope_max_seq_len",) * 2,
                 **{k: (k, k) for k in ("text_dim", "freq_dim", "ffn_dim", "num_layers", "cross_attn_norm", "eps")}}
ORIGINAL_DEFAULTS = dict(patch_size=[1, 2, 2], text_dim=4096, cross_attn_norm=True, qk_norm=True, eps=1e-6)
DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}  # safetensors -> torch
_json = functools.partial(read_json, what="checkpoint file", error=CheckpointError)


def _renamer(pairs: list[tuple[str, str]]):
    """One regex of all rules (group r<i> = rule i); each match is replaced by its rule's right side."""
    rx = re.compile("|".join(f"(?P<r{i}>{'^' if a[0] == '^' else '(?:^|(?<=[.]))'}{re.escape(a.lstrip('^'))}(?=[.]|$))"
                             for i, (a, _) in enumerate(pairs)))
    return lambda key: rx.sub(lambda m: pairs[int(m.lastgroup[1:])][1].lstrip("^"), key)


_TO_DIFFUSERS, _TO_ORIGINAL = _renamer(RENAMES), _renamer([(b, a) for a, b in RENAMES])
_WRAPPER_RX = re.compile(r"(?:^|(?<=\.))(" + "|".join(map(re.escape, WRAPPERS)) + ")")


def original_to_diffusers(sd: StateDict) -> StateDict:
    """Original Wan names -> diffusers `WanTransformer3DModel` names (the `RENAMES` table)."""
    return {_TO_DIFFUSERS(k): v for k, v in sd.items()}


def diffusers_to_original(sd: StateDict) -> StateDict:
    """The inverse of `original_to_diffusers` (the test fixtures write original files with it)."""
    return {_TO_ORIGINAL(k): v for k, v in sd.items()}


def wrappers_in(keys) -> list[str]:
    """The `WRAPPERS` prefixes found in `keys`, in first-seen order."""
    return list(dict.fromkeys(w for k in keys for w in _WRAPPER_RX.findall(k)))


def strip_wrappers(sd: StateDict) -> StateDict:
    """Remove every `WRAPPERS` prefix wherever it occurs as whole segments (`model._fsdp_wrapped_module.x` -> `x`);
    two keys that would become one are a CheckpointError, never a silent overwrite."""
    out: StateDict = {}
    for k, v in sd.items():
        if (new := _WRAPPER_RX.sub("", k)) in out:
            raise CheckpointError(f"two tensors become {new!r} without wrapper prefixes (one is {k!r})")
        out[new] = v
    return out


def _torch_load(path: Path) -> Any:
    """A torch file, only ever with weights_only=True, mmap'd (zip files): no tensor data is read until used."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as e:  # UnpicklingError for code; RuntimeError and others for damage
        text = str(e).strip() or e.__class__.__name__
        why = next((ln.strip() for ln in text.splitlines() if "GLOBAL" in ln), "weights_only refused it")
        raise CheckpointError(f"official checkpoint {path} " + (f"holds code, not a plain state dict ({why})" if
                              "Weights only load failed" in text else f"is not a torch file ({text.splitlines()[0]})"))\
            from None


def _locate(path: str | Path) -> tuple[str, Path, Any]:
    """(format, the folder or file holding the transformer, the official dict or None)."""
    if not (p := Path(path)).exists():
        raise CheckpointError(f"no checkpoint at {p} (the path does not exist)")
    p = p.parent if p.suffix == ".safetensors" else p  # a weights file means its folder (all shards, config.json)
    if p.is_dir():
        if (p / "meta.json").is_file():
            return "framecast", p, None
        for pointer in (p / "latest", p / "ckpt" / "latest"):  # a ckpt/ root or a run-stage dir
            if pointer.is_file():
                if not ((step := pointer.parent / pointer.read_text().strip()) / "meta.json").is_file():
                    raise CheckpointError(f"framecast checkpoint {pointer} points to {step}, which is incomplete")
                return "framecast", step, None
        p = p / "transformer" if (p / "model_index.json").is_file() and (p / "transformer").is_dir() else p
        cls = _json(p / "config.json").get("_class_name") if (p / "config.json").is_file() else None
        if cls in ("WanTransformer3DModel", "WanModel"):
            return ("diffusers" if cls == "WanTransformer3DModel" else "original"), p, None
        if not (p / "model.pt").is_file():
            names = sorted(x.name + "/" * x.is_dir() for x in p.iterdir())
            raise CheckpointError(f"{p} is not a Wan checkpoint: found {f'config.json of {cls!r}, ' if cls else ''}"
                                  f"{len(names)} entries {names[:5]}, no meta.json, Wan config.json or model.pt")
        p = p / "model.pt"
    if not isinstance(obj := _torch_load(p), dict) or not any(k in obj for k in OFFICIAL_KEYS[:2]):
        what = f"keys {sorted(map(str, obj))[:5]}" if isinstance(obj, dict) else f"a {type(obj).__name__}"
        raise CheckpointError(f"{p} is not an official checkpoint: it holds {what}, not generator_ema / generator")
    return "official", p, obj


def detect(path: str | Path) -> str:
    """The format of `path`: "framecast", "diffusers", "original" or "official" (module docstring)."""
    return _locate(path)[0]


def model_config(path_or_config: str | Path | dict[str, Any], **overrides: Any) -> C.ModelConfig:
    """The framecast ModelConfig of a Wan folder (diffusers or original), its config.json dict or a framecast
    checkpoint, plus field overrides (codec, codec_source, num_actions, ...), for building RunConfigs."""
    c, where = path_or_config, "the Wan config dict"
    if not isinstance(c, dict):
        fmt, loc, _ = _locate(path_or_config)
        if fmt == "framecast":
            try:
                mc = C.from_dict(C.upgrade(_json(loc / "meta.json")["config"])).model
            except (KeyError, TypeError, ConfigError) as e:
                raise CheckpointError(f"framecast checkpoint {loc} has no usable config ({e})") from None
            return C.model_preset(mc.preset, **{**C.to_dict(mc), **overrides})
        if fmt == "official":
            raise CheckpointError(f"official checkpoint {loc} holds no config; give a diffusers or original Wan folder")
        c, where = _json(loc / "config.json"), str(loc / "config.json")
    if orig := c.get("_class_name") == "WanModel" or "dim" in c:
        c = {**ORIGINAL_DEFAULTS, **c, **({"head_dim": c["dim"] // c["num_heads"]} if "num_heads" in c else {})}
    f = {field: c[names[orig]] for field, names in CONFIG_FIELDS.items() if c.get(names[orig]) is not None}
    odd = {k: c[k] for k in ("image_dim", "added_kv_proj_dim", "pos_embed_seq_len") if c.get(k) is not None} | {
        k: c[k] for k in ("model_type", "qk_norm") if c.get(k, True) not in ("t2v", True, "rms_norm_across_heads")}
    if odd or (lacks := sorted(set(CONFIG_FIELDS) - set(f) - {"out_channels", "rope_max_seq_len"})):
        raise CheckpointError(f"{where} is not a text-to-video Wan2.1 transformer config "
                              f"({f'unsupported {odd}' if odd else f'lacks {lacks}'})")
    f.update(patch_size=tuple(f["patch_size"]), out_channels=f.get("out_channels", f["in_channels"]))
    # every preset field is given: the preset only labels the config ("tiny" when no preset has these sizes)
    same = [n for n, p in C.MODEL_PRESETS.items() if all(f[k] == v for k, v in p.items())] + ["tiny"]
    return C.model_preset(same[0], **{**f, **overrides})


def _own(fmt: str, d: dict[str, Any]) -> dict[str, Any]:
    """A framecast model role is a Denoiser: its `net.*` is the transformer, its action embedder is not."""
    return d if fmt != "framecast" else {k.removeprefix("net."): v for k, v in d.items() if "action_embed" != k[:12]}


def _select(fmt: str, loc: Path, obj: Any, use_ema: bool | None, info: dict[str, Any]) -> StateDict | list[Path]:
    """The transformer weights on offer: the official state dict (mmap'd: no data read) or safetensors files.
    EMA unless use_ema is False; records the keys held, the key used and a framecast spec in `info`."""
    if fmt in ("diffusers", "original"):  # one set of weights: an index's shards or the single file
        if use_ema:
            raise CheckpointError(f"{fmt} checkpoint {loc} has no EMA weights (use_ema=True; it holds one set)")
        if not (loc / INDEX).is_file():
            if not (one := loc / f"{WEIGHTS}.safetensors").is_file():
                raise CheckpointError(f"{fmt} checkpoint {loc} has neither {one.name} nor {INDEX} (sharded weights)")
            return [one]
        wm = _json(loc / INDEX).get("weight_map")
        if not (files := [loc / f for f in sorted(set(wm.values()))] if isinstance(wm, dict) else []) or \
                not all(f.is_file() for f in files):
            raise CheckpointError(f"{fmt} checkpoint index {loc / INDEX} names no or missing shards "
                                  f"{[f.name for f in files if not f.is_file()][:3]}")
        return files
    if fmt == "framecast":
        meta = _json(loc / "meta.json")
        info["spec"] = SamplingSpec.from_json(meta.get("sampling"), where=str(loc / "meta.json"))
        info["keys"] = ["ema_model", "model"] if "model" in meta.get("ema", []) else ["model"]
    else:
        info["keys"] = [k for k in OFFICIAL_KEYS if k in obj]
        info["preset"] = next((p for word, p in GUESSES.items() if word in str(loc).lower()), None)
    ema = info["keys"][0] if info["keys"][0] in ("ema_model", "generator_ema") else None
    key = ema if ema and use_ema is not False else ("model" if fmt == "framecast" else "generator")
    if (use_ema and not ema) or key not in info["keys"]:
        raise CheckpointError(f"{fmt} checkpoint {loc} has no {'EMA' if use_ema else key} weights "
                              f"(use_ema={use_ema}; it holds {info['keys']})")
    info["key"] = key
    if fmt == "framecast":
        return [loc / f"{key}.safetensors"]
    if not isinstance(obj[key], dict) or not all(isinstance(v, torch.Tensor) for v in obj[key].values()):
        raise CheckpointError(f"official checkpoint {loc}: its {key} is not a state dict of tensors")
    return obj[key]


def _assemble(mc: C.ModelConfig, sd: StateDict, where: str, device, dtype) -> CausalWanTransformer:
    """Build on the meta device, check every key and shape, then take the tensors (no second copy)."""
    net = build_transformer(mc, device="meta")
    want = net.state_dict()
    missing, unexpected = [k for k in want if k not in sd], [k for k in sd if k not in want]
    shape = [f"{k} {[*sd[k].shape]} vs {[*want[k].shape]}" for k in want if k in sd and sd[k].shape != want[k].shape]
    if bad := [(n, x) for n, x in (("missing", missing), ("unexpected", unexpected), ("of another shape", shape)) if x]:
        vae = " (its tensors look like a Wan VAE)" if any(k.startswith(("encoder.", "decoder.")) for k in sd) else ""
        raise CheckpointError(f"{where} does not fit the Wan transformer of its config: " + "; ".join(
            f"{len(x)} {n} ({', '.join(x[:3])}{', ...' if len(x) > 3 else ''})" for n, x in bad) + vae)
    net.load_state_dict(sd, strict=True, assign=True)
    with torch.device(device):  # RoPE tables are not in state dicts: compute them on the real device
        net.rope = WanRotaryPosEmbed(mc.head_dim, mc.patch_size, mc.rope_max_seq_len)
    keep = getattr(net, "_keep_in_fp32_modules", None) or []  # diffusers' float32 islands (norms, time embedding)
    for name, p in net.to(device).named_parameters():
        p.data = p.data.to(torch.float32 if set(keep) & set(name.split(".")) else dtype)
    return net.eval()


def transformer_weights(path: str | Path, *, base: str | Path | None = None, use_ema: bool | None = None
                        ) -> tuple[C.ModelConfig, dict[str, Lazy], dict[str, Any]]:
    """(config, the transformer's tensors by diffusers name, unread (models/weights.py), what was found): the
    reading half of `load_transformer`, also used to load one FSDP shard per rank (train/distributed.py)."""
    fmt, loc, obj = _locate(path)
    if fmt == "official" and base is None:
        raise CheckpointError(f"official checkpoint {loc} holds no config: pass base= a Wan folder of its size")
    info: dict[str, Any] = {"format": fmt, "path": str(loc), "key": None, "keys": [], "spec": None, "preset": None}
    src = _select(fmt, loc, obj, use_ema, info)
    sd = {k: of_tensor(v) for k, v in src.items()} if isinstance(src, dict) else {}
    for f in src if isinstance(src, list) else []:
        sd.update(open_safetensors(f, f"{fmt} checkpoint file"))
    info["wrappers"], sd = wrappers_in(sd), strip_wrappers(_own(fmt, sd))
    sd = original_to_diffusers(sd) if fmt in ("original", "official") else sd
    mc = model_config(base if fmt == "official" else loc)
    info.update(config=mc, params=sum(v.numel() for v in sd.values()),
                dtypes=sorted({str(v.dtype).removeprefix("torch.") for v in sd.values()}))
    return mc, sd, info


def load_transformer(path: str | Path, *, base: str | Path | None = None, use_ema: bool | None = None,
                     device: str | torch.device = "cpu",
                     dtype: torch.dtype = torch.float32) -> tuple[CausalWanTransformer, dict[str, Any]]:
    """A CausalWanTransformer from any format and what was read (format, path, key and keys, wrappers, params,
    dtypes as stored, config, spec or preset). Anything partial, foreign or unsafe is one CheckpointError."""
    mc, sd, info = transformer_weights(path, base=base, use_ema=use_ema)
    return _assemble(mc, read_all(sd), f"{info['format']} checkpoint {info['path']}", device, dtype), info


FOUR = (1000, 750, 500, 250)
# name -> how a released checkpoint samples (method.md §2, §7.6): block size K (None: a bidirectional base) and
# warped step lists (the first block may have its own), or Euler steps + CFG; distilled generators use no CFG
SAMPLING_PRESETS: dict[str, dict[str, Any]] = {
    "framewise-1step": dict(block_size=1, denoising_steps=(1000,), first_block_steps=FOUR),
    "framewise-2step": dict(block_size=1, denoising_steps=(1000, 500), first_block_steps=FOUR),
    "framewise-4step": dict(block_size=1, denoising_steps=FOUR),
    "chunkwise-4step": dict(block_size=3, denoising_steps=FOUR),
    "bidirectional-euler": dict(block_size=None, steps=50, guidance=5.0),  # a bare Wan base
}
# released file names -> preset, first match wins (CF framewise-{1,2}step, framewise/, chunkwise/; SF and CausVid
# are chunk-wise 4-step); CF's ar_diffusion and bidirectional bases sample with Euler + CFG: no preset
GUESSES = {"ar_diffusion": None, "bidirectional": None, "framewise-1step": "framewise-1step",
           "framewise-2step": "framewise-2step", "framewise": "framewise-4step", "chunkwise": "chunkwise-4step",
           "self_forcing": "chunkwise-4step", "causvid": "chunkwise-4step"}


def preset_spec(name: str, *, latent_shape, pixel_shape, num_frames: int, codec: str, text_encoder: str,
                text_tokens: int, window: int = 0, sink: int = 0, shift: float = 5.0, **extra: Any) -> SamplingSpec:
    """The SamplingSpec of a preset at the caller's shapes (`extra`: more spec fields, e.g. negative_prompt).
    Causal presets get mode teacher_forcing (it only says causal); sigmas are exact (flow.few_step_sigmas)."""
    if name not in SAMPLING_PRESETS:
        raise ConfigError(f"unknown sampling preset {name!r}; choose one of {sorted(SAMPLING_PRESETS)}")
    p = SAMPLING_PRESETS[name]
    kw = dict(latent_shape=tuple(latent_shape), pixel_shape=tuple(pixel_shape), num_frames=num_frames, codec=codec,
              text_encoder=text_encoder, text_tokens=text_tokens, shift=shift, guidance=p.get("guidance", 1.0), **extra)
    if p["block_size"] is None:
        return SamplingSpec(mode="bidirectional", block_size=None, sampler="euler", steps=p["steps"], **kw)
    return SamplingSpec(mode="teacher_forcing", block_size=p["block_size"], window=window, sink=sink,
                        **few_step_fields(p["denoising_steps"], p.get("first_block_steps", ()), shift), **kw)


def components(path: str | Path, *, located: tuple[str, Path] | None = None) -> dict[str, str | None]:
    """Paths of a checkpoint's transformer / vae / text_encoder / tokenizer (None: absent): the VAE and umT5 hook."""
    fmt, loc = located or _locate(path)[:2]
    out: dict[str, str | None] = {"transformer": str(loc), "vae": None, "text_encoder": None, "tokenizer": None}
    if fmt == "diffusers" and (loc.parent / "model_index.json").is_file():
        out.update({n: str(loc.parent / n) for n in ("vae", "text_encoder", "tokenizer") if (loc.parent / n).is_dir()})
    elif fmt == "original":
        def first(*patterns: str) -> str | None:
            return next((str(x) for pat in patterns for x in sorted(loc.glob(pat))), None)

        tok = first("*/spiece.model", "*/*/spiece.model", "*/tokenizer.json", "*/*/tokenizer.json")
        out.update(vae=first("*VAE*.pth", "*vae*.pth"), text_encoder=first("models_t5*.pth", "*umt5*.pth"),
                   tokenizer=str(Path(tok).parent) if tok else None)
    return out


def inspect(path: str | Path) -> dict[str, Any]:
    """What a checkpoint holds, from safetensors headers or an mmap'd torch load, without reading weights:
    format, path, components, params, dtypes, wrappers, key and keys, spec or preset, truncated files."""
    fmt, loc, obj = _locate(path)
    info: dict[str, Any] = {"format": fmt, "path": str(loc), "components": components(loc, located=(fmt, loc)),
                            "key": None, "keys": [], "spec": None, "preset": None, "truncated": []}
    src = _select(fmt, loc, obj, None, info)
    shapes = {k: (str(v.dtype).removeprefix("torch."), list(v.shape)) for k, v in src.items()} \
        if isinstance(src, dict) else {}  # official: the tensors are views of the mmap'd file
    for f in src if isinstance(src, list) else []:  # a safetensors header: 8-byte length + JSON, no tensor data
        try:
            with open(f, "rb") as fh:
                head = json.loads(fh.read(n := struct.unpack("<Q", fh.read(8))[0]))
        except (OSError, struct.error, ValueError) as e:
            raise CheckpointError(f"{fmt} checkpoint file {f} has no readable safetensors header ({e})") from None
        head.pop("__metadata__", None)
        shapes.update({k: (DTYPES.get(v["dtype"], v["dtype"]), v["shape"]) for k, v in head.items()})
        if f.stat().st_size < 8 + n + max((v["data_offsets"][1] for v in head.values()), default=0):
            info["truncated"].append(str(f))
    shapes = _own(fmt, shapes)
    info.update(params=sum(torch.Size(s).numel() for _, s in shapes.values()),
                dtypes=sorted({d for d, _ in shapes.values()}), wrappers=wrappers_in(shapes))
    return info


def format_inspect(info: dict[str, Any]) -> str:
    """`inspect`'s answer as aligned, human-readable lines."""
    have, spec = [k for k, v in info["components"].items() if v], info["spec"]
    absent, wrappers = [k for k in info["components"] if k not in have], " ".join(info["wrappers"]) or "none"
    rows = [("format", f"{info['format']}  {info['path']}"),
            ("transformer", f"{info['params']:,} parameters ({' + '.join(info['dtypes']) or 'no tensors'})"),
            ("components", f"{', '.join(have)} (absent: {', '.join(absent) or 'none'})"),
            ("weights", info["keys"] and f"{info['key']} of {', '.join(info['keys'])}; wrappers {wrappers}"),
            ("sampling", f"{spec.describe()}, block size {spec.block_size}" if spec else
             info["preset"] and f"preset {info['preset']} (by its file name)"),
            *[("WARNING", f"{f} is truncated: its header declares more data than it has") for f in info["truncated"]]]
    return "\n".join(f"{k:<12} {v}" for k, v in rows if v)
