"""Every private torch API dcp_forge uses, in one place.

torch promises nothing about names that start with ``_``. Each one dcp_forge relies on is imported
here and nowhere else, with a fallback of our own for when a torch release moves, renames or
re-signs it: the fallback does the same job through public APIs (or by hand), at worst more slowly.
``tests/test_torch_compat.py`` checks every name below against the installed torch, so an upgrade
that changed one fails that test loudly instead of silently taking a fallback.

The on-storage contract depends on one of them more tightly: ``.metadata`` pickles DCP's
``_StorageInfo`` by its import path, so plain DCP readers find each item. Its fallback keeps the
same fields; a torch that dropped the class would need a compatibility shim in DCP itself.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import itertools
import pickle
import warnings
from collections.abc import Callable, Iterator, Mapping, MutableMapping
from typing import Any

import torch
import torch.serialization
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

# The torch release the private names below were checked against (tests/test_torch_compat.py).
CHECKED_TORCH = "2.13"

ObjectPath = tuple[str | int, ...]


# --- DCP's warnings -------------------------------------------------------------------------------
# What ``dcp.save`` / ``dcp.load`` warn at every call with ``no_dist=True`` or without a process
# group (the text of torch's message; tests/test_torch_compat.py checks it still matches).
SINGLE_PROCESS_WARNING = r"torch\.distributed is disabled, unavailable or uninitialized"


@contextlib.contextmanager
def single_process_dcp(no_dist: bool = True) -> Iterator[None]:
    """Around a ``dcp.save`` / ``dcp.load`` that dcp_forge runs in one process on purpose
    (``no_dist``): silence DCP's warning that it will, which tells the user nothing. Only that
    warning and only during the call; a user's own DCP calls still warn."""
    if not no_dist:
        yield
        return
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=SINGLE_PROCESS_WARNING, category=UserWarning)
        yield


# --- nested state dicts ---------------------------------------------------------------------------
def _set_element_by_hand(root: dict[str, Any], path: ObjectPath, value: Any) -> None:
    """DCP's ``_traverse.set_element``: walk ``path`` creating dicts (str keys) and lists (int keys)."""
    container: Any = root
    for here, after in itertools.pairwise(path):
        default: Any = {} if type(after) is str else []
        if isinstance(container, MutableMapping):
            container = container.setdefault(here, default)
        elif not isinstance(here, int):
            raise TypeError(f"object path {path!r}: the key {here!r} addresses a list")
        else:
            container.extend([None] * (here + 1 - len(container)))
            if container[here] is None:
                container[here] = default
            container = container[here]
    last = path[-1]
    if type(last) is int:
        container.extend([None] * (last + 1 - len(container)))
    container[last] = value


_torch_set_element: Callable[[dict[str, Any], ObjectPath, Any], None] | None
try:
    from torch.distributed.checkpoint._traverse import set_element as _torch_set_element
except ImportError:  # pragma: no cover - depends on the torch release
    _torch_set_element = None


def set_element(root: dict[str, Any], path: ObjectPath, value: Any) -> None:
    """Put ``value`` into the nested ``root`` at DCP's object ``path`` (``Metadata.planner_data``)."""
    if _torch_set_element is not None:
        try:
            _torch_set_element(root, path, value)
            return
        except TypeError:  # pragma: no cover - a changed signature: do it by hand
            pass
    _set_element_by_hand(root, path, value)


def _flatten_by_hand(state_dict: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, ObjectPath]]:
    """DCP's flattening (``_traverse.traverse_state_dict``): mappings are walked with their keys as
    strings, lists only when they hold tensors or containers that do; empty mappings vanish."""
    flat: dict[str, Any] = {}
    paths: dict[str, ObjectPath] = {}

    def terminal(value: Any) -> bool:
        if isinstance(value, Mapping):
            return False
        if not isinstance(value, list):
            return True
        return not any(isinstance(e, torch.Tensor) or (isinstance(e, (Mapping, list)) and not terminal(e))
                       for e in value)

    def walk(path: ObjectPath, value: Any) -> None:
        if isinstance(value, Mapping):
            for key, inner in value.items():
                walk((*path, str(key)), inner)
        elif terminal(value):
            key = ".".join(map(str, path))
            flat[key] = value
            paths[key] = path
        else:
            for i, inner in enumerate(value):
                walk((*path, i), inner)

    for key, value in state_dict.items():
        walk((str(key),), value)
    return flat, paths


_torch_flatten: Callable[[dict[str, Any]], tuple[dict[str, Any], dict[str, ObjectPath]]] | None
try:
    from torch.distributed.checkpoint._nested_dict import flatten_state_dict as _torch_flatten
except ImportError:  # pragma: no cover - depends on the torch release
    _torch_flatten = None


def flatten_state_dict(state_dict: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, ObjectPath]]:
    """``(flat, paths)``: the state dict with dotted keys as DCP flattens it, and each key's path."""
    if _torch_flatten is not None:
        try:
            return _torch_flatten(dict(state_dict))
        except TypeError:  # pragma: no cover - a changed signature: do it by hand
            pass
    return _flatten_by_hand(state_dict)


def _leaves_by_hand(tree: Any) -> list[Any]:
    if isinstance(tree, Mapping):
        return [leaf for value in tree.values() for leaf in _leaves_by_hand(value)]
    if isinstance(tree, (list, tuple)):
        return [leaf for value in tree for leaf in _leaves_by_hand(value)]
    return [tree]


_torch_tree_leaves: Callable[[Any], list[Any]] | None
try:
    from torch.utils._pytree import tree_leaves as _torch_tree_leaves
except ImportError:  # pragma: no cover - depends on the torch release
    _torch_tree_leaves = None


def tree_leaves(tree: Any) -> list[Any]:
    """The leaves of nested dicts, lists and tuples (torch's pytree, which knows more containers)."""
    if _torch_tree_leaves is not None:
        try:
            return _torch_tree_leaves(tree)
        except TypeError:  # pragma: no cover - a changed signature: do it by hand
            pass
    return _leaves_by_hand(tree)


# --- DCP's metadata and planners -----------------------------------------------------------------
try:
    from torch.distributed.checkpoint.filesystem import _StorageInfo as StorageInfo
except ImportError:  # pragma: no cover - depends on the torch release
    @dataclasses.dataclass
    class StorageInfo:  # type: ignore[no-redef]
        """Where one stored item is: DCP's ``_StorageInfo`` fields."""

        relative_path: str
        offset: int
        length: int


class EmptyStateDictLoadPlanner(DefaultLoadPlanner):
    """DCP's ``format_utils._EmptyStateDictLoadPlanner``, by hand: a load planner that rebuilds the
    whole nested state dict from the checkpoint's metadata (new tensors, placeholders for values),
    for reading a checkpoint without any model (conversion, export)."""

    def set_up_planner(self, state_dict: dict[str, Any], metadata: Metadata | None = None,
                       is_coordinator: bool = False) -> None:
        if state_dict:
            raise ValueError("EmptyStateDictLoadPlanner builds the state dict itself: pass an empty one")
        if metadata is None:
            raise ValueError("EmptyStateDictLoadPlanner needs the checkpoint's metadata")
        paths = metadata.planner_data or {}
        for fqn, item in metadata.state_dict_metadata.items():
            value: Any = torch.empty(item.size, dtype=item.properties.dtype) if isinstance(
                item, TensorStorageMetadata) else item
            if fqn in paths:
                set_element(state_dict, paths[fqn], value)
            else:
                state_dict[fqn] = value
        super().set_up_planner(state_dict, metadata, is_coordinator)


def fsspec_reader_class() -> type:
    """DCP's fsspec ``StorageReader`` (the benchmarks compare against it; not re-exported publicly)."""
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader

    return FsspecReader


# --- process groups ----------------------------------------------------------------------------------
def default_group_timeout() -> datetime.timedelta | None:
    """How long the job's default process group waits in a collective (``init_process_group(timeout=)``),
    None without one or where this torch does not say. No public API reads it back, and groups made by
    ``new_group`` do not inherit it (they get their backend's default: 30 minutes for gloo). Without it
    the caller keeps that default, as before."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return None
    try:
        group = dist.distributed_c10d._get_default_group()
        for device in group._device_types:
            timeout = group._get_backend(device).options._timeout
            if isinstance(timeout, datetime.timedelta):
                return timeout
    except (AttributeError, RuntimeError, ValueError):  # pragma: no cover - depends on the torch release
        return None
    return None


# --- DTensor layouts ------------------------------------------------------------------------------
def _local_shape_by_hand(shape: tuple[int, ...], mesh: Any, placements: Any) -> tuple[int, ...]:
    """This rank's shard shape under ``Shard(d)`` / ``Replicate()`` placements (torch.chunk sizes)."""
    sizes = list(shape)
    coordinate = mesh.get_coordinate()
    for mesh_dim, placement in enumerate(placements):
        dim = getattr(placement, "dim", None)
        if dim is None:
            continue
        parts = mesh.size(mesh_dim)
        chunk = -(-sizes[dim] // parts)
        start = min(coordinate[mesh_dim] * chunk, sizes[dim])
        sizes[dim] = max(0, min(chunk, sizes[dim] - start))
    return tuple(sizes)


_torch_local_shape: Callable[[Any, Any, Any], tuple[tuple[int, ...], tuple[int, ...]]] | None
try:
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset as _torch_local_shape
except ImportError:  # pragma: no cover - depends on the torch release
    _torch_local_shape = None


def simulated_device_mesh(mesh_shape: tuple[int, ...], rank: int) -> Any:
    """A CPU ``DeviceMesh`` as rank ``rank`` of a job would see it, with no process group behind it
    (``_init_backend=False, _rank=``): planning tests simulate many ranks in one process with it."""
    import math

    from torch.distributed.device_mesh import DeviceMesh

    return DeviceMesh("cpu", torch.arange(math.prod(mesh_shape)).reshape(mesh_shape), _init_backend=False,
                      _rank=rank)


def local_shard_shape(shape: tuple[int, ...], mesh: Any, placements: Any) -> tuple[int, ...]:
    """The shape of this rank's local shard of a DTensor of global ``shape``."""
    if _torch_local_shape is not None:
        try:
            return tuple(_torch_local_shape(shape, mesh, placements)[0])
        except TypeError:  # pragma: no cover - a changed signature: do it by hand
            pass
    return _local_shape_by_hand(tuple(shape), mesh, placements)


# --- lazy negative views -------------------------------------------------------------------------
def negative_view(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` with its lazy negative bit flipped (``torch._neg_view``): a view of the same storage
    reading as ``-tensor``, or, on a tensor carrying the bit, its raw storage. No public API sets or
    clears the bit, so there is no fallback: without it negative views cannot be stored exactly."""
    view = getattr(torch, "_neg_view", None)
    if view is None:  # pragma: no cover - depends on the torch release
        raise NotImplementedError("this torch has no torch._neg_view: dcp_forge cannot store or load "
                                  "lazily negated tensors exactly; resolve them first (.resolve_neg())")
    return view(tensor)


# --- async staging --------------------------------------------------------------------------------
try:
    from torch.distributed.checkpoint._state_dict_stager import StateDictStager
except ImportError:  # pragma: no cover - depends on the torch release
    StateDictStager = None  # type: ignore[assignment,misc]


# --- torch.save without its CRC pass -------------------------------------------------------------
def _zip_writer_without_crc() -> Callable[[torch.Tensor, Any], None] | None:
    """torch.save's own zip writer with ``compute_crc32=False`` for one call, if this torch has the
    private entry points (``PyTorchFileWriter(buffer, compute_crc32, alignment)`` and ``_save``)."""
    writer_class = getattr(torch._C, "PyTorchFileWriter", None)
    save = getattr(torch.serialization, "_save", None)
    alignment = getattr(torch.serialization, "_get_storage_alignment", None)
    if writer_class is None or save is None or alignment is None:
        return None

    def write(tensor: torch.Tensor, stream: Any) -> None:
        writer = writer_class(stream, False, alignment())
        save(tensor, writer, pickle, torch.serialization.DEFAULT_PROTOCOL, False)
        writer.write_end_of_file()
        del writer  # its destructor may still write

    return write


_write_without_crc = _zip_writer_without_crc()


class _CountingStream:
    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.written = 0

    def write(self, data: Any) -> int:
        self.written += memoryview(data).nbytes
        return self.stream.write(data)

    def flush(self) -> None:
        self.stream.flush()


def save_tensor_without_crc(tensor: torch.Tensor, stream: Any) -> None:
    """``torch.save(tensor, stream)``, skipping the CRC-32 torch computes over every byte when this
    torch lets us (the zip's CRC fields are then 0, which ``torch.load`` never checks); else plain
    ``torch.save``."""
    if _write_without_crc is not None:
        counted = _CountingStream(stream)
        try:
            _write_without_crc(tensor, counted)
            return
        except TypeError:  # a changed signature fails before writing; anything else is a real error
            if counted.written:
                raise
    torch.save(tensor, stream)


# --- staging with deferred copies ----------------------------------------------------------------
def tensor_version(tensor: torch.Tensor) -> int | None:
    """The tensor's version counter (autograd's ``_version``: every in-place change through a tensor
    sharing it, views and ``detach()``-ed aliases included, adds one); None where torch has none."""
    version = getattr(tensor, "_version", None)
    return version if isinstance(version, int) else None


# The two hooks of DCP's StateDictStager a deferred copy overrides: its per-storage copy (called once
# per distinct source storage of a stage call) and its per-tensor offload (which calls the former).
STAGER_HOOKS = ("_stage_untyped_storage", "_offload_tensor")


class _DeferringHooks:
    """What ``DeferredCopyStager`` adds to DCP's ``StateDictStager`` (a mixin, so that the class exists
    only where torch has the stager it builds on)."""

    def _setup_deferral(self, allocate: Callable[[int], torch.UntypedStorage]) -> None:
        from torch.utils.weak import WeakIdKeyDictionary

        self._allocate = allocate
        # One staging buffer per source storage, weakly keyed: freed with the source.
        self._buffers = WeakIdKeyDictionary()
        self._defer_min_bytes: int | None = None
        self._deferred_ids: set[int] = set()
        self.deferred: list[tuple[torch.UntypedStorage, torch.UntypedStorage]] = []
        self.watched: list[tuple[torch.Tensor, int | None]] = []

    def stage_deferring(self, state_dict: Any, defer_min_bytes: int | None, non_blocking: bool = False) -> Any:
        """A staged copy of ``state_dict`` whose storages of at least ``defer_min_bytes`` bytes are not
        copied yet (None: copy every one now). Afterwards ``deferred`` lists their (source, buffer)
        pairs, to copy before the staged copy is used, and ``watched`` the source tensors on them with
        their version counters at this call."""
        self._defer_min_bytes = defer_min_bytes
        self._deferred_ids = set()
        self.deferred, self.watched = [], []
        return self.stage(state_dict, non_blocking=non_blocking)  # type: ignore[attr-defined]

    def _stage_untyped_storage(self, storage: torch.UntypedStorage, non_blocking: bool = False) -> torch.UntypedStorage:
        nbytes = storage.nbytes()
        buffer = self._buffers.get(storage)
        if buffer is None or buffer.nbytes() != nbytes:  # new, or the source was resized in place
            buffer = self._allocate(nbytes)
            self._buffers[storage] = buffer
        if self._defer_min_bytes is not None and nbytes >= self._defer_min_bytes:
            self.deferred.append((storage, buffer))
            self._deferred_ids.add(id(storage))
        else:
            buffer.copy_(storage, non_blocking=non_blocking)
        return buffer

    def _offload_tensor(self, x: torch.Tensor, memo: Any, non_blocking: bool = False) -> torch.Tensor:
        staged = super()._offload_tensor(x, memo, non_blocking=non_blocking)  # type: ignore[misc]
        # As DCP decides whether a tensor has a storage of its own to stage (wrapper subclasses such
        # as DTensor have none: their inner tensors are staged through their slots).
        if (type(x) is torch.Tensor or x.data_ptr() != 0) and id(x.untyped_storage()) in self._deferred_ids:
            self.watched.append((x, tensor_version(x)))
        return staged

    def buffer_count(self) -> int:
        return len(self._buffers)

    def close(self) -> None:
        super().close()  # type: ignore[misc]
        self._buffers.clear()
        self.deferred, self.watched = [], []


if StateDictStager is not None and all(callable(getattr(StateDictStager, h, None)) for h in STAGER_HOOKS):
    class DeferredCopyStager(_DeferringHooks, StateDictStager):
        """DCP's ``StateDictStager`` (deep copy with tensors staged into CPU buffers kept per source
        storage, views rebuilt on their staged base) whose buffers come from ``allocate(nbytes)`` and
        whose large copies can be left for later (``stage_deferring``)."""

        def __init__(self, allocate: Callable[[int], torch.UntypedStorage]) -> None:
            super().__init__(pin_memory=False, share_memory=False)  # memory is allocate()'s business
            self._setup_deferral(allocate)

        # DCP's recursive deep copy enters torch.no_grad() at every object it visits, which costs about
        # as much as the walk itself; ``stage`` already runs under no_grad, so the recursion does not.
        deepcopy_with_tensor_offload = getattr(StateDictStager.deepcopy_with_tensor_offload, "__wrapped__",
                                               StateDictStager.deepcopy_with_tensor_offload)
else:  # pragma: no cover - depends on the torch release
    # Staging falls back to copying by hand at the call. mypy cannot type a name that is a class on
    # one branch and None on the other; callers check it against None before subclassing it.
    DeferredCopyStager = None  # type: ignore[misc, assignment]
