"""SafetensorsReader: a DCP storage reader over Hugging Face safetensors weights on any backend.

``url`` is a directory holding ``model.safetensors.index.json`` (its ``weight_map`` names the files),
a directory of ``*.safetensors`` files without an index, or one ``.safetensors`` file; local, or any
URL the storage registry opens (``s3://``, ``memory://``, ...). DCP's own ``HuggingFaceStorageReader``
reads through ``safe_open`` on local files only, so it cannot read object storage.

Call protocol (DCP's ``StorageReader``): ``reset`` → on every rank ``read_metadata`` (each rank reads
the small headers itself), ``set_up_storage_reader`` and ``prepare_local_plan``; on the coordinator
``prepare_global_plan``; on every rank ``read_data``, once or several times with different plans.

Every stored tensor is one chunk covering the whole tensor, so a destination that is a shard of a
DTensor (FSDP2, tensor parallelism) asks for a box of it (``ReadItem.storage_offsets`` / ``lengths``)
and only the byte runs that hold that box are read: a row block is one read, a column block one run
per row. Runs closer together than ``max_gap_bytes`` are read as one request with the gap (on object
stores, where a request costs about as much as a megabyte of data; never on local disk), in pieces of
at most ``max_span_bytes``; no rank ever holds a buffer larger than its own box or one such piece. A box read
in the stored dtype into a contiguous CPU destination goes straight into the destination's memory.

Headers are checked as the safetensors library checks them (``format/safetensors.py``), plus: the
files of an index exist and hold exactly the tensors the index assigns them, no name is stored twice,
and every file ends where its header says. Safetensors records no checksums, so values cannot be
verified beyond that. Symbolic links are followed (a Hub cache's snapshot is made of them).
"""

from __future__ import annotations

import json
import os
import threading
from collections import defaultdict
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner, ReadItem
from torch.distributed.checkpoint.storage import StorageReader
from torch.futures import Future

from ..errors import IntegrityError
from ..format.safetensors import (
    HEADER_LENGTH_BYTES,
    INDEX_NAME,
    StoredTensor,
    box_runs,
    check_file_name,
    decode_header,
    header_length,
)
from .backends import InputFile, LocalBackend
from .item_reader import byte_view
from .registry import open_backend, redact_url

# Gaps read through rather than skipped. Local disk: none (one pread per run costs microseconds and the
# kernel's readahead covers small gaps), so a rank reads exactly its boxes and needs no buffer.
# Object stores: a request costs about what reading a megabyte does.
LOCAL_MAX_GAP_BYTES = 0
REMOTE_MAX_GAP_BYTES = 1024 * 1024
MAX_SPAN_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True)
class SafetensorsItem:
    """Where one stored tensor is: its file (a name inside the directory) and its header entry."""

    file: str
    tensor: StoredTensor


@dataclass(frozen=True)
class ReadStats:
    """What one ``read_data`` call read: bytes requested from storage, per tensor name, and the
    largest temporary buffer it allocated."""

    bytes_read: int
    bytes_by_name: Mapping[str, int]
    largest_buffer: int


class SafetensorsReader(StorageReader):
    """Reads the safetensors weights at ``url``; see the module docstring."""

    def __init__(self, url: str | os.PathLike, storage_options: Mapping[str, Any] | None = None, *,
                 thread_count: int = 2, max_gap_bytes: int | None = None,
                 max_span_bytes: int = MAX_SPAN_BYTES) -> None:
        super().__init__()
        if not isinstance(thread_count, int) or thread_count < 1:
            raise ValueError(f"'thread_count' must be a positive int (got {thread_count!r})")
        if max_gap_bytes is not None and (not isinstance(max_gap_bytes, int) or max_gap_bytes < 0):
            raise ValueError(f"'max_gap_bytes' must be an int >= 0 or None (got {max_gap_bytes!r})")
        if not isinstance(max_span_bytes, int) or max_span_bytes < 1:
            raise ValueError(f"'max_span_bytes' must be a positive int (got {max_span_bytes!r})")
        self.storage_options = dict(storage_options or {})
        self.thread_count = thread_count
        self._max_gap_bytes = max_gap_bytes
        self.max_span_bytes = max_span_bytes
        self.items: dict[str, SafetensorsItem] = {}
        self.storage_data: dict[MetadataIndex, SafetensorsItem] = {}
        self.stats = ReadStats(0, {}, 0)  # accumulated over every read_data call
        self._known: Metadata | None = None
        self._directory = ""
        self._lock = threading.Lock()
        self.reset(url)

    @property
    def max_gap_bytes(self) -> int:
        if self._max_gap_bytes is not None:
            return self._max_gap_bytes
        return LOCAL_MAX_GAP_BYTES if isinstance(self.backend, LocalBackend) else REMOTE_MAX_GAP_BYTES

    @property
    def where(self) -> str:
        return redact_url(self.url)

    # --- DCP StorageReader protocol ----------------------------------------------------------
    def reset(self, checkpoint_id: str | os.PathLike | None = None) -> None:
        if checkpoint_id is not None:
            self.url = os.fspath(checkpoint_id)
            self.backend, self.path = open_backend(self.url, self.storage_options)
            self._known = None

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike) -> bool:
        return isinstance(checkpoint_id, (str, os.PathLike))

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        """Every tensor's dtype and shape, from the headers (read once; later calls reuse them)."""
        if kwargs.get("rank") is not None:
            raise FileNotFoundError("safetensors weights have no per-rank metadata")
        if self._known is None:
            self.items = self._read_headers()
            self._known = _metadata_of(self.items)
        return self._known

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self.read_metadata()
        self.storage_data = {MetadataIndex(name, [0] * len(item.tensor.shape)): item
                             for name, item in self.items.items()}

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        per_file: dict[str, list[ReadItem]] = defaultdict(list)
        for item in plan.items:
            per_file[self._item(item).file].append(item)
        files = sorted(per_file)
        if files:
            with ThreadPoolExecutor(max_workers=min(self.thread_count, len(files)),
                                    thread_name_prefix="forge-st-read") as pool:
                for stats in pool.map(lambda f: self._read_file(f, per_file[f], planner), files):
                    self._add(stats)
        fut: Future[None] = Future()
        fut.set_result(None)
        return fut

    # --- headers ------------------------------------------------------------------------------
    def _read_headers(self) -> dict[str, SafetensorsItem]:
        backend, path = self.backend, self.path
        if path.endswith(".safetensors") and not backend.fs.isdir(path):
            directory, files, assigned = os.path.dirname(path), [os.path.basename(path)], None
        else:
            directory = path
            names = backend.list_dir(path)
            if INDEX_NAME in names:
                assigned = self._read_index(backend.join(path, INDEX_NAME))
                files = sorted(set(assigned.values()))
            else:
                files, assigned = sorted(n for n in names if n.endswith(".safetensors")), None
            if not files:
                raise FileNotFoundError(f"no safetensors weights at {self.where} (neither {INDEX_NAME} nor "
                                        "*.safetensors files)")
        self._directory = directory
        items: dict[str, SafetensorsItem] = {}
        for file in files:
            where = self._where(file)
            for tensor in self._read_header(backend.join(directory, file), where):
                if tensor.name in items:
                    raise IntegrityError(f"{self.where}: tensor {tensor.name!r} is stored in both "
                                         f"{items[tensor.name].file} and {file}")
                if assigned is not None and assigned.get(tensor.name) != file:
                    raise IntegrityError(f"{where} holds {tensor.name!r}, which {INDEX_NAME} assigns to "
                                         f"{assigned.get(tensor.name)!r}")
                items[tensor.name] = SafetensorsItem(file, tensor)
        if assigned is not None and (absent := sorted(set(assigned) - set(items))):
            raise IntegrityError(f"{self.where}: {INDEX_NAME} lists {len(absent)} tensor(s) no file holds: "
                                 f"{absent[:5]}")
        return items

    def _read_index(self, index_path: str) -> dict[str, str]:
        where = f"{self.where}/{INDEX_NAME}"
        try:
            weight_map = json.loads(self.backend.fs.cat_file(self._followed(index_path)))["weight_map"]
        except (ValueError, KeyError, TypeError) as err:
            raise IntegrityError(f"{where} is not a weights index with a 'weight_map' ({err})") from err
        if not isinstance(weight_map, dict):
            raise IntegrityError(f"{where}: 'weight_map' must be an object")
        return {str(name): check_file_name(file, where) for name, file in weight_map.items()}

    def _followed(self, path: str) -> str:
        """``path`` with symbolic links resolved on local disk. Weights are no dcp_forge checkpoint,
        whose files must be plain: a Hugging Face Hub cache's snapshot links every file to a blob."""
        return os.path.realpath(path) if isinstance(self.backend, LocalBackend) else path

    def _read_header(self, file_path: str, where: str) -> list[StoredTensor]:
        file_path = self._followed(file_path)
        try:
            size = int(self.backend.fs.size(file_path))
            handle = self.backend.open_input(file_path)
        except FileNotFoundError as err:
            raise IntegrityError(f"{where} is missing") from err
        try:
            prefix = bytearray(min(HEADER_LENGTH_BYTES, size))
            handle.read_into(0, memoryview(prefix))
            length = header_length(bytes(prefix), where)
            if HEADER_LENGTH_BYTES + length > size:
                raise IntegrityError(f"{where}: its header needs {length} bytes, the file holds {size}")
            header = bytearray(length)
            handle.read_into(HEADER_LENGTH_BYTES, memoryview(header))
        finally:
            handle.close()
        return decode_header(bytes(header), where, size)[1]

    def _where(self, file: str) -> str:
        """A weight file, named for messages (the URL itself when it names one file)."""
        return self.where if self._directory != self.path else f"{self.where}/{file}"

    # --- data ---------------------------------------------------------------------------------
    def _item(self, read_item: ReadItem) -> SafetensorsItem:
        try:
            return self.storage_data[read_item.storage_index]
        except KeyError:
            raise IntegrityError(f"{self.where} holds no tensor {read_item.storage_index.fqn!r} "
                                 f"(at offset {list(read_item.storage_index.offset or [])})") from None

    def _read_file(self, file: str, items: Sequence[ReadItem], planner: LoadPlanner) -> ReadStats:
        handle = self.backend.open_input(self._followed(self.backend.join(self._directory, file)))
        by_name: dict[str, int] = defaultdict(int)
        total = largest = 0
        try:
            for item in sorted(items, key=lambda i: (self._item(i).tensor.begin, list(i.storage_offsets))):
                stored = self._item(item).tensor
                target = planner.resolve_tensor(item).detach()
                if tuple(target.shape) != tuple(item.lengths):
                    raise IntegrityError(f"{self.where}: {stored.name!r} box {list(item.lengths)} does not fit its "
                                         f"destination of shape {list(target.shape)}")
                read, buffer = self._read_box(handle, self._where(file), stored, item, target)
                planner.commit_tensor(item, target)
                by_name[stored.name] += read
                total += read
                largest = max(largest, buffer)
        finally:
            handle.close()
        return ReadStats(total, dict(by_name), largest)

    def _read_box(self, handle: InputFile, where: str, stored: StoredTensor, item: ReadItem,
                  target: torch.Tensor) -> tuple[int, int]:
        """Read ``item``'s box of ``stored`` into ``target``; returns (bytes read, largest buffer)."""
        run, starts = box_runs(stored.shape, stored.dtype.itemsize, item.storage_offsets, item.lengths)
        direct = (type(target) is torch.Tensor and target.dtype == stored.dtype and target.device.type == "cpu"
                  and target.layout == torch.strided and target.is_contiguous() and not target.is_conj()
                  and not target.is_neg())
        dest = target if direct else torch.empty(tuple(item.lengths), dtype=stored.dtype)
        largest = 0 if direct else dest.nbytes
        view = np.asarray(byte_view(dest)) if len(starts) else np.zeros(0, np.uint8)
        read = 0
        try:
            for first, last in self._spans(starts, run):
                span_start = int(starts[first])
                span_bytes = int(starts[last - 1]) + run - span_start
                target_bytes = view[first * run:last * run]
                if last - first == 1:
                    handle.read_into(stored.begin + span_start, target_bytes.data)
                else:
                    buffer = np.empty(span_bytes, dtype=np.uint8)
                    largest = max(largest, span_bytes)
                    handle.read_into(stored.begin + span_start, buffer.data)
                    _gather_runs(buffer, starts[first:last] - span_start, run, target_bytes)
                read += span_bytes
        except EOFError as err:
            raise IntegrityError(f"{where} is truncated: {err} (reading {stored.name!r})") from err
        if not direct:
            target.copy_(dest)
        return read, largest

    def _spans(self, starts: np.ndarray, run: int) -> list[tuple[int, int]]:
        """Runs grouped into requests ``[first, last)``: a gap over ``max_gap_bytes`` or a span over
        ``max_span_bytes`` starts a new one."""
        if not len(starts):
            return []
        gaps = starts[1:] - (starts[:-1] + run)
        breaks = [0, *(np.nonzero(gaps > self.max_gap_bytes)[0] + 1).tolist(), len(starts)]
        spans = []
        for begin, end in zip(breaks[:-1], breaks[1:], strict=True):
            first = begin
            while first < end:
                limit = int(starts[first]) + max(self.max_span_bytes, run) - run
                last = int(np.searchsorted(starts[first:end], limit, side="right")) + first
                last = max(last, first + 1)
                spans.append((first, last))
                first = last
        return spans

    def _add(self, stats: ReadStats) -> None:
        with self._lock:
            merged = dict(self.stats.bytes_by_name)
            for name, n in stats.bytes_by_name.items():
                merged[name] = merged.get(name, 0) + n
            self.stats = ReadStats(self.stats.bytes_read + stats.bytes_read, merged,
                                   max(self.stats.largest_buffer, stats.largest_buffer))


def _gather_runs(buffer: np.ndarray, offsets: np.ndarray, run: int, out: np.ndarray) -> None:
    """Copy the runs of ``run`` bytes at ``offsets`` of ``buffer`` into ``out`` back to back."""
    steps = np.diff(offsets)
    if len(steps) and (steps == steps[0]).all():
        rows = np.lib.stride_tricks.as_strided(buffer[int(offsets[0]):], shape=(len(offsets), run),
                                               strides=(int(steps[0]), 1), writeable=False)
        out.reshape(len(offsets), run)[:] = rows
        return
    for i, offset in enumerate(offsets.tolist()):
        out[i * run:(i + 1) * run] = buffer[offset:offset + run]


def _metadata_of(items: Mapping[str, SafetensorsItem]) -> Metadata:
    """DCP metadata for ``items``: each tensor one chunk, the whole tensor."""
    state_dict_metadata: dict[str, Any] = {}
    for name, item in items.items():
        shape = torch.Size(item.tensor.shape)
        state_dict_metadata[name] = TensorStorageMetadata(
            properties=TensorProperties(dtype=item.tensor.dtype), size=shape,
            chunks=[ChunkStorageMetadata(offsets=torch.Size([0] * len(shape)), sizes=shape)])
    metadata = Metadata(state_dict_metadata=state_dict_metadata,
                        storage_data={MetadataIndex(n, [0] * len(i.tensor.shape)): i for n, i in items.items()})
    metadata.storage_meta = StorageMeta()
    return metadata
