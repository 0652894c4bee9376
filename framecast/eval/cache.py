"""Small evaluation networks trained once and cached on disk (the toy video encoder, the world-model IDM and
state probe): safetensors weights beside a JSON of what made them, named by a hash of that JSON's key."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable

from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import CheckpointError


def load_or_train(cache_dir: str | Path, name: str, key: dict[str, Any], build: Callable[[dict], nn.Module],
                  train: Callable[[], tuple[nn.Module, dict]], *, what: str | None = None) -> tuple[nn.Module, dict]:
    """(net in eval mode, info) from `<cache_dir>/<name>_<hash(key)>.safetensors`, or train() and store it.

    build(info) makes an untrained net to load the weights into; train() returns (net, stats) and info is
    {**key, **stats}. A corrupt cache entry is an error naming the file (a CheckpointError: a user error, which
    the CLI prints as one line), never silently retrained over."""
    tag = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]
    path = Path(cache_dir) / f"{name}_{tag}.safetensors"
    if path.exists():
        try:
            info = json.loads(path.with_suffix(".json").read_text())
            net = build(info)
            net.load_state_dict(load_file(str(path)))
        except Exception as e:
            raise CheckpointError(f"cached {what or name} {path} is unreadable ({e}); delete it to retrain") from e
        return net.eval(), info
    net, stats = train()
    info = {**key, **stats}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp))
    path.with_suffix(".json").write_text(json.dumps(info, indent=1))
    tmp.replace(path)  # the weights appear last and atomically: a cut-off run leaves no usable half file
    return net.eval(), info
