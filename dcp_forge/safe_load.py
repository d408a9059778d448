"""Turning stored bytes back into objects without running code from the checkpoint.

Non-tensor values (python scalars, lists, RNG tuples, dataloader state) are stored by DCP as pickles.
They are read back with ``torch.load(weights_only=True)``: only tensors and plain containers and
scalars can come out, so a crafted checkpoint cannot execute anything on load.
"""

from __future__ import annotations

import io
import pickle

import torch

from .errors import IntegrityError


class UnsafeCheckpointError(IntegrityError, pickle.UnpicklingError):
    """A stored value needs code execution to unpickle; dcp_forge refuses it."""


def load_object(data: io.BytesIO | bytes | memoryview, *, name: str) -> object:
    """Unpickle one stored non-tensor value safely; ``name`` says which (component / key)."""
    stream = data if isinstance(data, io.BytesIO) else io.BytesIO(bytes(data))
    try:
        return torch.load(stream, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise UnsafeCheckpointError(
            f"refusing to load {name!r}: its stored value needs more than tensors and plain python "
            f"types to unpickle ({err}). If you trust this checkpoint and the type is yours, allow it "
            "with torch.serialization.add_safe_globals([...])."
        ) from err


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP's ``.metadata`` allowing only the classes DCP itself puts there."""

    def find_class(self, module: str, name: str):  # noqa: D102 - pickle protocol
        if module.startswith("torch.distributed.checkpoint.") or (module, name) in _METADATA_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and (name == "Size" or isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise UnsafeCheckpointError(
            f"refusing to load checkpoint metadata: it references {module}.{name}, which DCP metadata "
            "never contains (a crafted or corrupted .metadata file?)"
        )


_METADATA_GLOBALS = {
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PureWindowsPath"),
    ("collections", "OrderedDict"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "slice"),
    ("_codecs", "encode"),
}


def load_dcp_metadata(data: bytes, *, name: str):
    """Unpickle DCP ``Metadata`` without allowing arbitrary globals; ``name`` is for messages."""
    try:
        return _MetadataUnpickler(io.BytesIO(data)).load()
    except UnsafeCheckpointError:
        raise
    except (pickle.UnpicklingError, EOFError, AttributeError, ValueError, TypeError) as err:
        raise IntegrityError(f"{name} is not readable DCP metadata: {err}") from err
