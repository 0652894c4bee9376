"""Tiny umT5 text encoders written offline in both layouts `framecast.models.umt5.load_umt5` reads.

* `build_tiny_tokenizer(dir)`: a Unigram + Metaspace tokenizer (umT5's kind, with `<pad>`=0, `</s>`=1,
  `<unk>`=2 and eos appended) built from a handful of sentences with the `tokenizers` library and saved as
  the `google/umt5-xxl/` folder layout (tokenizer.json + tokenizer_config.json) AutoTokenizer reads.
* `write_transformers_text_encoder(root, seed)`: a diffusers-like root, `text_encoder/` + `tokenizer/`.
* `write_original_umt5_pth(path, seed)`: the original Wan layout, the bf16 .pth (original key names via the
  inverse key table), a umt5 `config.json` beside it and `google/umt5-xxl/`.
The same seed gives the same weights in both (bf16-representable values), so the two load identically.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

SENTENCES = [
    "a red circle moving left",
    "a blue square bouncing fast across the screen",
    "the camera pans slowly over a city at night",
    "a cat sits on a wooden table in the sun",
    "waves crash on the rocks under a grey sky",
]
SPECIALS = ["<pad>", "</s>", "<unk>"]


def _vocab() -> list[tuple[str, float]]:
    """Specials, then one piece per word (frequent words score higher), then single characters as fallback."""
    words: dict[str, int] = {}
    for s in SENTENCES:
        for w in s.split():
            words[w] = words.get(w, 0) + 1
    chars = sorted({c for s in SENTENCES for c in s if c != " "})
    vocab = [(t, 0.0) for t in SPECIALS] + [("\u2581", -3.0)]
    vocab += [("\u2581" + w, -1.0 / n - 0.001 * i) for i, (w, n) in enumerate(sorted(words.items()))]
    vocab += [(c, -6.0 - 0.001 * i) for i, c in enumerate(chars)]
    return vocab


TINY_VOCAB = len(_vocab())


def build_tiny_tokenizer(folder: str | Path) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.Unigram(_vocab(), unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    tok.save(str(folder / "tokenizer.json"))
    special = {"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"}
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "T5Tokenizer", "model_max_length": 512, "extra_ids": 0, **special}, indent=1))
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=1))
    return folder


def tiny_umt5_config(vocab_size: int = TINY_VOCAB) -> dict:
    return dict(model_type="umt5", architectures=["UMT5EncoderModel"], vocab_size=vocab_size, d_model=32,
                num_layers=2, num_heads=4, d_kv=8, d_ff=64, relative_attention_num_buckets=8,
                relative_attention_max_distance=16, feed_forward_proj="gated-gelu", dense_act_fn="gelu_new",
                layer_norm_epsilon=1e-6, tie_word_embeddings=False, pad_token_id=0, eos_token_id=1)


def tiny_umt5_model(seed: int):
    """A UMT5EncoderModel with seeded, bf16-representable random weights (every tensor distinct)."""
    from transformers import UMT5Config, UMT5EncoderModel

    model = UMT5EncoderModel(UMT5Config.from_dict(tiny_umt5_config())).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layer_norm.weight"):
                value = 1.0 + 0.2 * torch.randn(p.shape, generator=g)
            else:
                value = torch.randn(p.shape, generator=g) / (p.shape[-1] ** 0.5 if p.dim() == 2 else 1.0)
            p.copy_(value.bfloat16().float())
    return model


def write_transformers_text_encoder(root: str | Path, seed: int = 0) -> Path:
    """`root/text_encoder/` (config.json + model.safetensors, fp32) with `root/tokenizer/`; returns root."""
    from transformers.utils import logging

    root = Path(root)
    logging.disable_progress_bar()
    tiny_umt5_model(seed).save_pretrained(str(root / "text_encoder"), safe_serialization=True)
    build_tiny_tokenizer(root / "tokenizer")
    (root / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline"}))
    return root


def write_original_umt5_pth(path: str | Path, seed: int = 0) -> Path:
    """The original bf16 state dict at `path`, a umt5 config.json and `google/umt5-xxl/` beside it."""
    from framecast.models.umt5 import to_original

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sd = {k: v.to(torch.bfloat16).contiguous() for k, v in to_original(tiny_umt5_model(seed).state_dict()).items()}
    torch.save(sd, path)
    (path.parent / "config.json").write_text(json.dumps(tiny_umt5_config(), indent=1))
    build_tiny_tokenizer(path.parent / "google" / "umt5-xxl")
    return path
