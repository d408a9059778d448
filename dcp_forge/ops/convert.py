"""Converting checkpoints: dcp_forge (or plain DCP) → one ``torch.save`` file or safetensors, and a
``torch.save`` file → dcp_forge.

Reading a whole checkpoint follows DCP's ``format_utils`` route (``EmptyStateDictLoadPlanner``
rebuilds the nested state dict from the metadata) with dcp_forge's reader, so every item's checksum
is verified, and with non-tensor values unpickled by the restricted loader (DCP's planner would run
``torch.load(weights_only=False)`` on them). The top-level keys are storage keys (docs/FORMAT.md):
``model``, ``rng@rank0``, ...; ``components=`` reads only some components.

Files are written like any file the user writes: through a temporary name in the destination's
directory, fsynced and renamed, with the mode a new file gets there (0666 less the umask).
"""

from __future__ import annotations

import dataclasses
import io
import os
import pickle
import re
import stat
from collections.abc import Callable, Collection, Mapping
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import Metadata
from torch.distributed.checkpoint.planner import ReadItem

from .._torch_compat import EmptyStateDictLoadPlanner, set_element, single_process_dcp
from ..core.keys import parse_storage_key, top_level_key
from ..core.patterns import SharingPattern
from ..errors import ComponentDeclarationError, MissingComponentError, first_rank_failure
from ..format.safe_load import UnsafeCheckpointError, load_object
from ..planners import ForgeSavePlanner
from ..storage import ForgeStorageReader, ForgeStorageWriter

FORMATS = ("torch", "safetensors", "dcp_forge")
_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")


class _SafeEmptyStateDictLoadPlanner(EmptyStateDictLoadPlanner):
    """DCP's rebuild-everything planner, with non-tensor values unpickled safely, rebuilding only
    the storage keys in ``storage_keys`` (None: all)."""

    unpickles_safely = True  # the reader need not vet bytes items a second time

    def __init__(self, storage_keys: Collection[str] | None = None) -> None:
        super().__init__()
        self.storage_keys = None if storage_keys is None else frozenset(storage_keys)

    def set_up_planner(self, state_dict: dict[str, Any], metadata: Metadata | None = None,
                       is_coordinator: bool = False) -> None:
        if metadata is not None and self.storage_keys is not None:
            metadata = dataclasses.replace(metadata, state_dict_metadata={
                fqn: item for fqn, item in metadata.state_dict_metadata.items()
                if top_level_key(fqn) in self.storage_keys})
        super().set_up_planner(state_dict, metadata, is_coordinator)

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        fqn = read_item.dest_index.fqn
        set_element(self.original_state_dict, self.mappings[fqn], load_object(value, name=fqn))


def _storage_keys_of(metadata: Metadata, components: Collection[str], where: str) -> set[str]:
    """The storage keys holding ``components`` (a PER_RANK component has one per rank)."""
    by_component: dict[str, set[str]] = {}
    for key in {top_level_key(fqn) for fqn in metadata.state_dict_metadata}:
        by_component.setdefault(parse_storage_key(key).component, set()).add(key)
    missing = sorted(set(components) - set(by_component))
    if missing:
        raise MissingComponentError(f"checkpoint {where} has no component {', '.join(map(repr, missing))} "
                                    f"(it has {sorted(by_component)})")
    return set().union(*(by_component[c] for c in components))


def load_checkpoint_state(url: str | os.PathLike, storage_options: Mapping[str, Any] | None = None, *,
                          thread_count: int = 2, components: Collection[str] | None = None) -> dict[str, Any]:
    """The checkpoint at ``url`` as one nested state dict keyed by storage key (on this process):
    every component, or only ``components`` (``MissingComponentError`` naming what the checkpoint
    has when one is absent). ``CheckpointNotFoundError`` when ``url`` holds no committed checkpoint."""
    if isinstance(components, str):
        raise ComponentDeclarationError(f"'components' must be a collection of component keys; write "
                                        f"components=[{components!r}]")
    reader = ForgeStorageReader(url, storage_options, thread_count=thread_count)
    # Read (and check) the records first: inside dcp.load, DCP turns a failing read_metadata into an
    # AssertionError that keeps only the message (and logs tracebacks).
    metadata = reader.read_metadata()
    keys = None if components is None else _storage_keys_of(metadata, components, os.fspath(url))
    planner = _SafeEmptyStateDictLoadPlanner(keys)
    try:
        with single_process_dcp():
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


def _write_file(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """``write(tmp)`` fills a temporary file next to ``path``, which then becomes ``path``: fsynced,
    renamed, with the mode a new file gets in that directory (whatever mode ``write`` left it with:
    safetensors, for one, replaces it with a private 0600 file)."""
    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)  # the umask applies, as to any new file
    try:
        mode = stat.S_IMODE(os.fstat(fd).st_mode)
    finally:
        os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, mode)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def save_torch_file(state: Any, path: str | os.PathLike) -> None:
    """``torch.save`` of ``state`` to ``path``, durably (a temporary name, fsynced, renamed)."""
    _write_file(path, lambda tmp: torch.save(dict(state) if isinstance(state, Mapping) else state, tmp))


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
    _write_file(path, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt", "written_by": "dcp_forge"}))
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
        with single_process_dcp():
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
