"""Converting checkpoints: dcp_forge (or plain DCP) → one ``torch.save`` file or safetensors, and a
``torch.save`` file → dcp_forge.

Reading a whole checkpoint follows DCP's ``format_utils`` route (``EmptyStateDictLoadPlanner``
rebuilds the nested state dict from the metadata) with dcp_forge's reader, so every item's checksum
is verified, and with non-tensor values unpickled by the restricted loader (DCP's planner would run
``torch.load(weights_only=False)`` on them). The top-level keys are storage keys (docs/FORMAT.md):
``model``, ``rng@rank0``, ...
"""

from __future__ import annotations

import io
import os
import pickle
import re
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.planner import ReadItem

from .._torch_compat import EmptyStateDictLoadPlanner, set_element
from ..core.patterns import SharingPattern
from ..errors import ComponentDeclarationError, first_rank_failure
from ..format.safe_load import UnsafeCheckpointError, load_object
from ..planners import ForgeSavePlanner
from ..storage import ForgeStorageReader, ForgeStorageWriter

FORMATS = ("torch", "safetensors", "dcp_forge")
_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")


class _SafeEmptyStateDictLoadPlanner(EmptyStateDictLoadPlanner):
    """DCP's rebuild-everything planner, with non-tensor values unpickled safely."""

    unpickles_safely = True  # the reader need not vet bytes items a second time

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        fqn = read_item.dest_index.fqn
        set_element(self.original_state_dict, self.mappings[fqn], load_object(value, name=fqn))


def load_checkpoint_state(url: str | os.PathLike, storage_options: Mapping[str, Any] | None = None, *,
                          thread_count: int = 2) -> dict[str, Any]:
    """The whole checkpoint at ``url`` as one nested state dict keyed by storage key (on this process)."""
    planner = _SafeEmptyStateDictLoadPlanner()
    reader = ForgeStorageReader(url, storage_options, thread_count=thread_count)
    # Read (and check) the records first: inside dcp.load, DCP turns a failing read_metadata into an
    # AssertionError that keeps only the message.
    reader.read_metadata()
    try:
        dcp.load({}, storage_reader=reader, planner=planner, no_dist=True)
    except BaseException as exc:  # DCP wraps errors in CheckpointException (a BaseException)
        original = first_rank_failure(exc)
        if original is None:
            raise
        raise original from exc
    return planner.original_state_dict


def _flatten(value: Any, prefix: str, out: dict[str, Any]) -> None:
    if isinstance(value, Mapping):
        for key, inner in value.items():
            _flatten(inner, f"{prefix}.{key}" if prefix else str(key), out)
    elif isinstance(value, (list, tuple)) and any(isinstance(v, torch.Tensor) for v in value):
        for i, inner in enumerate(value):
            _flatten(inner, f"{prefix}.{i}", out)
    else:
        out[prefix] = value


def save_torch_file(state: Mapping[str, Any], path: str | os.PathLike) -> None:
    """``torch.save`` to ``path``, durably (written to a temporary name, fsynced, renamed)."""
    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        torch.save(dict(state), f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_safetensors_file(state: Mapping[str, Any], path: str | os.PathLike) -> list[str]:
    """The tensors of ``state`` (flattened with dotted keys) to a safetensors file; returns the keys of
    non-tensor values, which safetensors cannot hold and are left out."""
    try:
        from safetensors.torch import save_file
    except ImportError as err:
        raise ImportError("pip install 'dcp-forge[safetensors]' to write safetensors files") from err
    flat: dict[str, Any] = {}
    _flatten(state, "", flat)
    tensors = {k: v.detach().contiguous() for k, v in flat.items() if isinstance(v, torch.Tensor)}
    save_file(tensors, os.fspath(path), metadata={"format": "pt", "written_by": "dcp_forge"})
    return sorted(k for k, v in flat.items() if not isinstance(v, torch.Tensor))


def torch_file_to_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, *, component: str | None = None,
                             storage_options: Mapping[str, Any] | None = None) -> str:
    """A ``torch.save`` file as a committed dcp_forge checkpoint at ``dst``; returns ``dst``.

    With ``component``, the whole loaded object becomes that one component; otherwise the file must
    hold a dict whose top-level keys are valid component keys (``model``, ``optimizer``, ...), each of
    which becomes a component. Components are REPLICATED: one copy, loadable at any world size.
    The file is read with ``weights_only=True``.
    """
    try:
        loaded = torch.load(os.fspath(src), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:  # what weights_only raises for anything beyond tensors & plain types
        raise UnsafeCheckpointError(f"refusing to load {os.fspath(src)!r}: it needs more than tensors and plain "
                                    f"python types to unpickle ({err})") from err
    if component is not None:
        state = {component: loaded}
    elif isinstance(loaded, Mapping) and loaded and all(isinstance(k, str) and _KEY_RE.match(k) for k in loaded):
        state = dict(loaded)
    else:
        keys = list(loaded)[:5] if isinstance(loaded, Mapping) else type(loaded).__name__
        raise ComponentDeclarationError(
            f"{os.fspath(src)!r} does not hold a dict of components (found {keys}); pass --component NAME "
            "to store the whole file as one component")
    for key in state:
        if not _KEY_RE.match(key):
            raise ComponentDeclarationError(f"component key {key!r} must match [A-Za-z_][A-Za-z0-9_-]*")
    planner = ForgeSavePlanner({key: SharingPattern.REPLICATED for key in state})
    writer = ForgeStorageWriter(dst, storage_options)
    try:
        dcp.save(state, storage_writer=writer, planner=planner, no_dist=True)
    except BaseException as exc:
        original = first_rank_failure(exc)
        if original is None:
            raise
        raise original from exc
    return os.fspath(dst)


def guess_format(path: str | os.PathLike) -> str:
    """The target format a destination path implies: .pt/.pth/.bin → torch, .safetensors, else dcp_forge."""
    name = os.fspath(path).lower()
    if name.endswith(".safetensors"):
        return "safetensors"
    if name.endswith((".pt", ".pth", ".bin", ".ckpt")):
        return "torch"
    return "dcp_forge"
