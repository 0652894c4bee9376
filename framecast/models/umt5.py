"""umT5, Wan2.1's frozen text encoder (Wan2.1, arXiv 2503.20314; umT5: Chung et al. 2023, arXiv 2304.09151).

* `UMT5TextEncoder` follows the `TextEncoder` protocol of `conditioning.py`: prompts are tokenised to
  `max_tokens` (512 for Wan) with padding and truncation, the encoder runs with the attention mask, and the
  padded positions are zeroed, so the network's unmasked cross-attention sees zeros there (as Wan does).
  `encode` returns float32 on the encoder's device whatever the weight dtype (bf16 on CUDA by default,
  float32 on CPU), and keeps the last `cache_size` prompts in memory, so switching back to a prompt is free.
* `PromptCache` stores one safetensors per prompt, keyed by sha1(encoder_id, prompt), written atomically;
  a dataset's prompts are encoded once and reused by later runs.
* `load_umt5` reads a transformers folder (a diffusers Wan root, its `text_encoder/`, or any folder with
  config.json + weights) or an original Wan `models_t5_umt5-xxl-enc-bf16.pth`, converted with the key table
  below. Keys are strict: a partial or foreign file is one `CheckpointError`. transformers is imported lazily.
"""

from __future__ import annotations

import hashlib
import html
import json
import os
import re
import tempfile
from collections import OrderedDict
from pathlib import Path

import torch

from ..errors import CheckpointError, ConfigError, DataError

Tensor = torch.Tensor
ORIGINAL_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
ORIGINAL_FORMAT = f"Wan umT5 state dict ({ORIGINAL_FILE})"
# umT5-XXL, the encoder Wan2.1 conditions on (4096-d states); a umt5 config.json beside the .pth overrides it.
UMT5_XXL = dict(model_type="umt5", vocab_size=256384, d_model=4096, d_ff=10240, d_kv=64, num_heads=64,
                num_layers=24, relative_attention_num_buckets=32, relative_attention_max_distance=128,
                feed_forward_proj="gated-gelu", dense_act_fn="gelu_new", layer_norm_epsilon=1e-6,
                tie_word_embeddings=False, pad_token_id=0, eos_token_id=1)

# Original Wan key -> transformers UMT5EncoderModel key. umT5 has a relative-attention bias in every layer
# (T5 shares layer 0's), so `pos_embedding` is a per-layer entry. `encoder.embed_tokens` is tied to `shared`.
GLOBAL_KEYS = {"token_embedding.weight": "shared.weight", "norm.weight": "encoder.final_layer_norm.weight"}
LAYER_KEYS = {
    "norm1.weight": "layer.0.layer_norm.weight",
    "attn.q.weight": "layer.0.SelfAttention.q.weight",
    "attn.k.weight": "layer.0.SelfAttention.k.weight",
    "attn.v.weight": "layer.0.SelfAttention.v.weight",
    "attn.o.weight": "layer.0.SelfAttention.o.weight",
    "pos_embedding.embedding.weight": "layer.0.SelfAttention.relative_attention_bias.weight",
    "norm2.weight": "layer.1.layer_norm.weight",
    "ffn.gate.0.weight": "layer.1.DenseReluDense.wi_0.weight",
    "ffn.fc1.weight": "layer.1.DenseReluDense.wi_1.weight",
    "ffn.fc2.weight": "layer.1.DenseReluDense.wo.weight",
}
TIED_KEY = "encoder.embed_tokens.weight"


def key_table(num_layers: int) -> dict[str, str]:
    """Every original key of a `num_layers` encoder -> its transformers key."""
    table = dict(GLOBAL_KEYS)
    for i in range(num_layers):
        table.update({f"blocks.{i}.{a}": f"encoder.block.{i}.{b}" for a, b in LAYER_KEYS.items()})
    return table


def to_transformers(sd: dict, num_layers: int, where: str = "state dict") -> dict[str, Tensor]:
    """Original Wan keys -> transformers keys, refusing any missing or unexpected key."""
    if not isinstance(sd, dict) or not all(isinstance(v, Tensor) for v in sd.values()):
        raise CheckpointError(f"{where}: not a {ORIGINAL_FORMAT}: expected a flat dict of tensors, "
                              f"got {type(sd).__name__}")
    table = key_table(num_layers)
    missing, unexpected = [k for k in table if k not in sd], sorted(k for k in sd if k not in table)
    if missing or unexpected:
        found = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
        raise CheckpointError(f"{where}: not a {ORIGINAL_FORMAT} with the config's {num_layers} layers (the file "
                              f"has {found}): missing keys {missing[:3]} ({len(missing)}), unexpected keys "
                              f"{unexpected[:3]} ({len(unexpected)})")
    out = {table[k]: v for k, v in sd.items()}
    out[TIED_KEY] = out["shared.weight"]
    return out


def to_original(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """The inverse: a transformers UMT5EncoderModel state dict -> original Wan keys (tests write these)."""
    layers = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.block."))
    inverse = {b: a for a, b in key_table(layers).items()}
    return {inverse[k]: v for k, v in sd.items() if k != TIED_KEY}


def default_dtype(device: torch.device | str, dtype: torch.dtype | None) -> torch.dtype:
    """bf16 weights on CUDA (as Wan runs umT5), float32 on the CPU, unless asked otherwise."""
    return dtype if dtype is not None else torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def clean_prompt(prompt: str) -> str:
    """Wan's whitespace clean of a prompt: HTML entities unescaped, runs of whitespace collapsed."""
    return re.sub(r"\s+", " ", html.unescape(html.unescape(prompt))).strip()


class UMT5TextEncoder:
    """A frozen UMT5EncoderModel + tokenizer -> `encode(prompts) -> [B, max_tokens, d_model]` float32."""

    def __init__(self, model, tokenizer, *, max_tokens: int = 512, device: torch.device | str = "cpu",
                 dtype: torch.dtype | None = None, cache_size: int = 32, batch_size: int = 8,
                 encoder_id: str | None = None) -> None:
        self.device = torch.device(device)
        self.dtype = default_dtype(self.device, dtype)
        self.model = model.to(self.device, self.dtype).eval().requires_grad_(False)
        self.tokenizer = tokenizer
        cfg = model.config
        self.dim, self.max_tokens = int(cfg.d_model), int(max_tokens)
        self.cache_size, self.batch_size = int(cache_size), max(1, int(batch_size))
        self.encoder_id = encoder_id or f"umt5:d{cfg.d_model}:l{cfg.num_layers}:v{cfg.vocab_size}:t{max_tokens}"
        self._cache: OrderedDict[str, Tensor] = OrderedDict()

    def tokenize(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """input_ids and attention_mask [B, max_tokens] (padded and truncated, eos kept) on the device."""
        tok = self.tokenizer([clean_prompt(p) for p in prompts], padding="max_length", truncation=True,
                             max_length=self.max_tokens, add_special_tokens=True, return_tensors="pt")
        return tok["input_ids"].to(self.device), tok["attention_mask"].to(self.device)

    @torch.no_grad()  # not inference_mode: the states feed cross-attention layers that are trained
    def _forward(self, prompts: list[str]) -> Tensor:
        ids, mask = self.tokenize(prompts)
        states = self.model(input_ids=ids, attention_mask=mask).last_hidden_state.float()
        return states.masked_fill(~mask.bool()[..., None], 0.0)  # padded positions exactly zero

    def _remember(self, prompt: str, states: Tensor) -> None:
        if self.cache_size > 0:
            self._cache[prompt] = states.clone()  # not a view that keeps its whole batch alive
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)

    def encode(self, prompts: list[str]) -> Tensor:
        found = {p: self._cache[p] for p in dict.fromkeys(prompts) if p in self._cache}
        for p in found:
            self._cache.move_to_end(p)
        todo = [p for p in dict.fromkeys(prompts) if p not in found]
        for i in range(0, len(todo), self.batch_size):
            chunk = todo[i:i + self.batch_size]
            for p, s in zip(chunk, self._forward(chunk)):
                found[p] = s
                self._remember(p, s)
        if not prompts:
            return torch.zeros(0, self.max_tokens, self.dim, device=self.device)
        return torch.stack([found[p] for p in prompts])  # a copy: callers cannot change the cache


class PromptCache:
    """`root/<k[:2]>/<k>.safetensors` per prompt, k = sha1(encoder_id, prompt); trailing zero rows (the
    padding) are not stored and come back as zeros, so a round trip is exact."""

    def __init__(self, root: str | Path, encoder_id: str) -> None:
        self.root, self.encoder_id = Path(root), str(encoder_id)

    def key(self, prompt: str) -> str:
        return hashlib.sha1(f"{self.encoder_id}\n{prompt}".encode()).hexdigest()

    def path(self, prompt: str) -> Path:
        k = self.key(prompt)
        return self.root / k[:2] / f"{k}.safetensors"

    def get(self, prompt: str) -> Tensor | None:
        """The stored [max_tokens, dim] float32 states of `prompt`, or None when it is not cached."""
        from safetensors import safe_open

        path = self.path(prompt)
        if not path.exists():
            return None
        try:
            with safe_open(str(path), framework="pt") as f:
                meta, rows = json.loads((f.metadata() or {})["entry"]), f.get_tensor("text")
            max_tokens = int(meta["max_tokens"])
        except Exception as e:  # noqa: BLE001 - any unreadable file is the same data error
            raise DataError(f"{path}: unreadable prompt-cache entry ({_one_line(e)})") from None
        if meta.get("encoder_id") != self.encoder_id or meta.get("prompt") != prompt:
            raise DataError(f"{path}: prompt-cache entry belongs to another prompt or encoder")
        out = rows.new_zeros(max_tokens, rows.shape[1])
        out[: rows.shape[0]] = rows
        return out

    def put(self, prompt: str, states: Tensor) -> Path:
        """Store [max_tokens, dim] states atomically (a temporary file renamed into place)."""
        from safetensors.torch import save

        if states.dim() != 2:
            raise ValueError(f"prompt states must be [max_tokens, dim], got {tuple(states.shape)}")
        states = states.detach().float().cpu()
        used = (states != 0).any(dim=1).nonzero()
        rows = states[: int(used.max()) + 1 if len(used) else 0].contiguous()
        meta = {"encoder_id": self.encoder_id, "prompt": prompt, "max_tokens": states.shape[0]}
        data = save({"text": rows}, metadata={"entry": json.dumps(meta, sort_keys=True)})  # one key: same bytes
        path = self.path(prompt)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    def encode_cached(self, prompts: list[str], encoder) -> Tensor:
        """[B, max_tokens, dim] float32 on the CPU; only prompts not on disk reach `encoder.encode`."""
        found = {p: self.get(p) for p in dict.fromkeys(prompts)}
        todo = [p for p, s in found.items() if s is None]
        if todo:
            for p, s in zip(todo, encoder.encode(todo)):
                self.put(p, s)
                found[p] = s.detach().float().cpu()
        want = (encoder.max_tokens, encoder.dim)
        for p, s in found.items():
            if tuple(s.shape) != want:
                raise DataError(f"{self.path(p)}: cached states are {tuple(s.shape)}, the encoder gives {want}")
        if not prompts:
            return torch.zeros(0, *want)
        return torch.stack([found[p] for p in prompts])


def _transformers():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    transformers.utils.logging.disable_progress_bar()
    return transformers


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"


def _layout(path: Path) -> tuple[Path, Path]:
    """(weights: a transformers folder or the original .pth, default tokenizer folder) of `path`."""
    if path.is_file():
        return path, path.parent / "google" / "umt5-xxl"
    if (path / ORIGINAL_FILE).exists():  # an original Wan root (its config.json is the DiT's)
        return path / ORIGINAL_FILE, path / "google" / "umt5-xxl"
    if (path / "text_encoder" / "config.json").exists():  # a diffusers Wan root
        return path / "text_encoder", path / "tokenizer"
    if (path / "config.json").exists():
        own = (path / "tokenizer.json").exists() or (path / "tokenizer_config.json").exists()
        return path, path if own else path.parent / "tokenizer"
    raise CheckpointError(f"{path}: no umT5 text encoder here (expected a transformers folder with a umt5 "
                          f"config.json, a diffusers Wan root with text_encoder/, or {ORIGINAL_FILE})")


def _json(path: Path) -> dict:
    try:
        out = json.loads(Path(path).read_text())
        if not isinstance(out, dict):
            raise TypeError(f"a JSON object was expected, got {type(out).__name__}")
        return out
    except (OSError, ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: unreadable text encoder config ({_one_line(e)})") from None


def read_config(weights: Path, config: dict | str | Path | None = None):
    """The UMT5Config of `weights`: its folder's config.json; for a .pth umT5-XXL, updated by a umt5 config
    beside it (Wan's root config.json is the DiT's and is skipped). `config` (dict or JSON path) overrides."""
    if weights.is_dir():
        values = _json(weights / "config.json")
        if values.get("model_type") != "umt5":
            raise CheckpointError(f"{weights / 'config.json'}: not a umt5 config "
                                  f"(model_type {values.get('model_type')!r})")
    else:  # umt5_config.json (a sidecar, as the VAE's vae_config.json), else a umt5 config.json beside it
        values = dict(UMT5_XXL)
        for beside in (weights.parent / "umt5_config.json", weights.parent / "config.json"):
            if config is None and beside.exists() and _json(beside).get("model_type") == "umt5":
                values.update(_json(beside))
                break
    if config is not None:
        values.update(_json(config) if isinstance(config, (str, Path)) else config)
    return _transformers().UMT5Config.from_dict(values)


def _load_folder(folder: Path, cfg, dtype: torch.dtype):
    transformers = _transformers()
    where = f"{folder} (transformers UMT5EncoderModel folder)"
    try:
        model, info = transformers.UMT5EncoderModel.from_pretrained(
            str(folder), config=cfg, dtype=dtype, local_files_only=True, output_loading_info=True)
    except Exception as e:  # noqa: BLE001 - whatever transformers raises on a bad folder
        raise CheckpointError(f"{where}: cannot load ({_one_line(e)})") from None
    bad = {k: sorted(info.get(k) or []) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if any(bad.values()):
        raise CheckpointError(f"{where}: " + ", ".join(f"{k.replace('_', ' ')} {v[:3]} ({len(v)})"
                                                       for k, v in bad.items() if v))
    return model


def _load_original(path: Path, cfg):
    transformers = _transformers()
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - a pickle with code, a truncated or foreign file
        raise CheckpointError(f"{path}: not a loadable {ORIGINAL_FORMAT} ({_one_line(e)})") from None
    sd = to_transformers(sd, cfg.num_layers, where=str(path))
    with torch.device("meta"):
        model = transformers.UMT5EncoderModel(cfg)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    wrong = [f"{k} {tuple(sd[k].shape)} (config: {s})" for k, s in shapes.items()
             if k in sd and tuple(sd[k].shape) != s]
    if wrong:
        raise CheckpointError(f"{path}: {ORIGINAL_FORMAT} does not fit its config: {wrong[:2]} ({len(wrong)}); "
                              "put the encoder's umt5 config.json beside it")
    model.load_state_dict(sd, strict=True, assign=True)
    model.tie_weights()
    return model


def load_tokenizer(source, where: Path):
    """A tokenizer object as given, or one read from a folder (`google/umt5-xxl/` layout: tokenizer.json)."""
    if source is not None and not isinstance(source, (str, Path)):
        return source
    folder, transformers = Path(source), _transformers()
    try:
        return transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable tokenizer folder
        first = _one_line(e)
    try:  # a tokenizer_config naming a class that needs sentencepiece: tokenizer.json alone
        return transformers.PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), pad_token="<pad>",
                                                    eos_token="</s>", unk_token="<unk>")
    except Exception:  # noqa: BLE001
        raise CheckpointError(f"{folder}: no umT5 tokenizer for {where} ({first}); pass tokenizer=") from None


def load_umt5(path: str | Path, *, tokenizer=None, max_tokens: int = 512, device: torch.device | str = "cpu",
              dtype: torch.dtype | None = None, config: dict | str | Path | None = None,
              dim: int | None = None, cache_size: int = 32) -> UMT5TextEncoder:
    """A UMT5TextEncoder from a transformers folder or an original Wan .pth; `dim`, when given, is the
    model's text_dim and is checked against the config before any weight is read."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such umT5 text encoder (a transformers folder, a diffusers Wan root "
                              f"or {ORIGINAL_FILE})")
    weights, tok_default = _layout(path)
    cfg = read_config(weights, config)
    if dim is not None and int(cfg.d_model) != int(dim):
        raise ConfigError(f"the umt5 encoder at {path} gives {cfg.d_model}-d states but model.text_dim is {dim}")
    dtype = default_dtype(device, dtype)
    model = _load_original(weights, cfg) if weights.is_file() else _load_folder(weights, cfg, dtype)
    tok = load_tokenizer(tokenizer if tokenizer is not None else tok_default, weights)
    if tok.pad_token_id is None or len(tok) > cfg.vocab_size:
        raise CheckpointError(f"{path}: tokenizer ({len(tok)} tokens, pad id {tok.pad_token_id}) does not fit "
                              f"the encoder's vocabulary of {cfg.vocab_size}")
    encoder_id = f"umt5:{weights.name}:d{cfg.d_model}:l{cfg.num_layers}:v{cfg.vocab_size}:t{max_tokens}"
    return UMT5TextEncoder(model, tok, max_tokens=max_tokens, device=device, dtype=dtype,
                           cache_size=cache_size, encoder_id=encoder_id)
