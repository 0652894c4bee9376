"""Weights read only when asked for: the whole tensor (one process) or a range of its rows (one FSDP shard).

A `Lazy` stands for one tensor of a weights file. The format readers (models/wan.py, train/distributed.py)
rename keys over dicts of them exactly as over dicts of tensors, so a 14B real score can be loaded rank by
rank, each reading only the rows of its own shards (safetensors slices; official `.pt` files are mmap'd).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open

from ..errors import CheckpointError

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


class Lazy:
    """One stored tensor: `shape`, `dtype`, `numel()`; `full()` reads it, `rows(a, b)` reads rows [a, b) of dim 0."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, read: Callable[[slice | None], torch.Tensor]) -> None:
        self.shape, self.dtype, self._read = torch.Size(shape), dtype, read

    def numel(self) -> int:
        return self.shape.numel()

    def full(self) -> torch.Tensor:
        return self._read(None)

    def rows(self, start: int, stop: int) -> torch.Tensor:
        if not self.shape:  # a scalar is never sharded
            return self.full()
        return self._read(slice(start, stop))


def of_tensor(t: torch.Tensor) -> Lazy:
    """A tensor already in memory or mmap'd (an official `.pt` file): slicing reads only those pages."""
    return Lazy(tuple(t.shape), t.dtype, lambda s: t if s is None else t[s].clone())


def open_safetensors(path: str | Path, error: str = "checkpoint file") -> dict[str, Lazy]:
    """Every tensor of a safetensors file, unread; a damaged file is one CheckpointError naming it."""
    path = Path(path)
    try:
        f = safe_open(str(path), framework="pt")
        keys = list(f.keys())
    except Exception as e:  # SafetensorError, OSError: damaged or truncated
        raise CheckpointError(f"{error} {path} is corrupt or truncated ({str(e).splitlines()[0]})") from None

    def reader(key: str):
        def read(s: slice | None) -> torch.Tensor:
            try:
                return f.get_tensor(key) if s is None else f.get_slice(key)[s]
            except Exception as e:
                raise CheckpointError(f"{error} {path} is corrupt or truncated (tensor {key!r}: "
                                      f"{str(e).splitlines()[0]})") from None
        return read

    out = {}
    for k in keys:
        sl = f.get_slice(k)
        dtype = DTYPES.get(sl.get_dtype())
        if dtype is None:
            raise CheckpointError(f"{error} {path}: tensor {k!r} has dtype {sl.get_dtype()}, not a weights dtype")
        out[k] = Lazy(tuple(sl.get_shape()), dtype, reader(k))
    return out


def read_all(sd: dict[str, Lazy | torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.full() if isinstance(v, Lazy) else v for k, v in sd.items()}
