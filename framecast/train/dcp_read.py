"""Reading `torch.distributed.checkpoint` (DCP) folders safely, in any number of processes (docs/scaling.md).

DCP stores its index (`.metadata`) as a Python pickle and reads it with `pickle.load`, which would run
whatever code a crafted file names. `SafeReader` reads it with an unpickler that only builds the classes
a DCP index is made of (its metadata records, torch dtypes and sizes, plain containers); anything else is a
`CorruptCheckpoint` naming the file. framecast never stores non-tensor values in DCP (those are unpickled
with `weights_only=False` by DCP itself): trainer state lives in the checkpoint's meta.json.

A DCP checkpoint's tensors are keyed `<stem>.<key>`: `model.net.blocks.0.attn1.to_q.weight`, `ema_model....`,
`optim_model.<param>.exp_avg`. Stems hold no dots, so the stem is the text before the first one.
"""

from __future__ import annotations

import io
import pickle
import warnings
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader

from ..errors import CheckpointError

DIR = "dcp"  # the DCP folder inside a framecast checkpoint folder
FORMAT = "dcp"  # meta.json "format"

_ALLOWED = {
    "collections": {"OrderedDict", "defaultdict"},
    "builtins": {"set", "frozenset", "slice", "tuple", "list", "dict", "int", "float", "str", "bool", "bytes"},
    "torch": {"Size", "device", "float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8",
              "uint8", "bool", "complex64", "complex128", "strided", "contiguous_format", "preserve_format",
              "channels_last", "layout", "memory_format", "dtype"},
    "torch._utils": {"_rebuild_tensor_v2"},
    "torch.serialization": {"_get_layout"},  # how torch.layout values pickle
    "pathlib": {"PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath"},  # the checkpoint id
    "torch.distributed.checkpoint.metadata": {"Metadata", "MetadataIndex", "StorageMeta", "TensorProperties",
                                              "TensorStorageMetadata", "ChunkStorageMetadata", "BytesStorageMetadata",
                                              "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
}


class CorruptCheckpoint(CheckpointError):
    """A checkpoint file that is damaged or not what it claims to be (the message names it)."""


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if name in _ALLOWED.get(module, ()):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a DCP index")


class SafeReader(FileSystemReader):
    """FileSystemReader whose index is read with the restricted unpickler above."""

    def read_metadata(self, *args: Any, **kwargs: Any):
        path = Path(self.path) / ".metadata"
        try:
            data = path.read_bytes()
            meta = _Unpickler(io.BytesIO(data)).load()
        except FileNotFoundError:
            raise CheckpointError(f"checkpoint file {path} is missing") from None
        except (pickle.UnpicklingError, EOFError, AttributeError, ValueError, TypeError) as e:
            raise CorruptCheckpoint(f"checkpoint index {path} is corrupt or not a DCP index ({e})") from None
        from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

        if not isinstance(meta, Metadata):
            raise CorruptCheckpoint(f"checkpoint index {path} is not a DCP index (got {type(meta).__name__})")
        if getattr(meta, "storage_meta", None) is None:
            meta.storage_meta = StorageMeta()
        meta.storage_meta.load_id = self.load_id
        return meta


def folder(ckpt: str | Path) -> Path:
    return Path(ckpt) / DIR


def index(ckpt: str | Path) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Every tensor a DCP checkpoint holds: key -> (global shape, dtype)."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    meta = SafeReader(folder(ckpt)).read_metadata()
    return {k: (tuple(v.size), v.properties.dtype) for k, v in meta.state_dict_metadata.items()
            if isinstance(v, TensorStorageMetadata)}


def stems(ckpt: str | Path) -> list[str]:
    return sorted({k.split(".", 1)[0] for k in index(ckpt)})


def read(ckpt: str | Path, stem: str) -> dict[str, torch.Tensor]:
    """The full tensors of `stem` in this process alone (DCP reassembles the shards of every rank)."""
    import torch.distributed.checkpoint as dcp

    keys = {k: v for k, v in index(ckpt).items() if k.split(".", 1)[0] == stem}
    if not keys:
        raise CheckpointError(f"checkpoint {ckpt} has no {stem!r} weights (it holds {stems(ckpt)})")
    out = {k: torch.empty(shape, dtype=dtype) for k, (shape, dtype) in keys.items()}
    try:
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(out, storage_reader=SafeReader(folder(ckpt)), no_dist=True)
    except CheckpointError:
        raise
    except Exception as e:  # DCP raises CheckpointException and others for damaged shard files
        raise CorruptCheckpoint(f"checkpoint {folder(ckpt)} could not be read ({str(e).splitlines()[0][:200]})") from None
    return {k.split(".", 1)[1]: v for k, v in out.items()}
