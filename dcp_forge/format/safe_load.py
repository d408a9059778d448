"""Turning stored bytes back into objects without running code from the checkpoint.

Non-tensor values (python scalars, lists, RNG tuples, dataloader state) are stored by DCP as pickles.
They are read back with ``torch.load(weights_only=True)``: only tensors and plain containers and
scalars can come out, so a crafted checkpoint cannot execute anything on load.
"""

from __future__ import annotations

import io
import pickle
import re
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import Metadata

from ..errors import IntegrityError, UnsafeCheckpointError

__all__ = ["UnsafeCheckpointError", "load_dcp_metadata", "load_object"]

# torch's weights-only refusal names the global it refused in a long multi-line message.
_REFUSED_GLOBAL_RE = re.compile(r"Unsupported global: GLOBAL (\S+)")


def load_object(data: io.BytesIO | bytes | bytearray | memoryview, *, name: str) -> object:
    """Unpickle one stored non-tensor value safely; ``name`` says which (component / key)."""
    stream = data if isinstance(data, io.BytesIO) else io.BytesIO(bytes(data))
    try:
        return torch.load(stream, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        refused = refused_global(err)
        what = f"it would call {refused}" if refused else "it needs more than tensors and plain types"
        raise UnsafeCheckpointError(
            f"refusing to load {name!r}: unpickling its stored value is not safe ({what}; a crafted "
            "checkpoint?). If you trust this checkpoint and the type is yours, allow it with "
            "torch.serialization.add_safe_globals([...])."
        ) from err
    except (RuntimeError, EOFError, ValueError) as err:  # not a torch.save blob at all
        raise IntegrityError(f"stored value of {name!r} is not readable: {err}") from err


def refused_global(err: BaseException) -> str | None:
    """The global (``module.name``) torch's weights-only unpickler refused in ``err``, if it names one."""
    cause: BaseException | None = err
    while cause is not None:
        found = _REFUSED_GLOBAL_RE.search(str(cause))
        if found:
            return found.group(1)
        cause = cause.__cause__
    return None


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP's ``.metadata`` allowing only the exact classes DCP itself puts there.

    Exact (module, name) pairs, never a module prefix: protocol 4 resolves dotted names, so allowing
    "any name in torch.distributed.checkpoint.filesystem" would let ``os.system`` through as
    ``filesystem`` + ``"os.system"``.
    """

    def find_class(self, module: str, name: str) -> Any:  # noqa: D102 - pickle protocol
        if (module, name) in _METADATA_GLOBALS or (
                module == "torch" and "." not in name and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise UnsafeCheckpointError(
            f"refusing to load checkpoint metadata: it references {module}.{name}, which DCP metadata "
            "never contains (a crafted or corrupted .metadata file?)"
        )


# What DCP 2.x writes into .metadata (found by recording find_class over metadata of every dtype,
# chunked, bytes and optimizer items, from both dcp_forge's writer and DCP's FileSystemWriter).
_METADATA_GLOBALS = frozenset({
    *(("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorStorageMetadata", "BytesStorageMetadata",
        "ChunkStorageMetadata", "TensorProperties", "_MEM_FORMAT_ENCODING")),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    # Older torch pickled TensorProperties from its sharded-tensor module; plain DCP still loads such
    # checkpoints. Both are plain records (a dataclass whose state is dtype, layout, flags and the enum).
    ("torch.distributed._shard.sharded_tensor.metadata", "TensorProperties"),
    ("torch.distributed._shard.sharded_tensor.metadata", "MEM_FORMAT_ENCODING"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PureWindowsPath"),
    ("collections", "OrderedDict"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("_codecs", "encode"),
})


def load_dcp_metadata(data: bytes, *, name: str) -> Metadata:
    """Unpickle DCP ``Metadata`` without allowing arbitrary globals; ``name`` is for messages."""
    try:
        return _MetadataUnpickler(io.BytesIO(data)).load()
    except UnsafeCheckpointError:
        raise
    except (pickle.UnpicklingError, EOFError, AttributeError, ValueError, TypeError) as err:
        raise IntegrityError(f"{name} is not readable DCP metadata: {err}") from err
