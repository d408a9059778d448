"""ForgeStorageReader: DCP storage reader over any backend, verifying checksums as it reads.

Call protocol (DCP's ``StorageReader``): ``reset`` → on every rank ``read_metadata``,
``set_up_storage_reader`` and ``prepare_local_plan``; on the coordinator ``prepare_global_plan``;
on every rank ``read_data``.

Reads only committed checkpoints (or plain DCP ones, which have no manifest). Each stored item is
read once per ``read_data`` however many destinations need it, files are read by parallel threads,
and every item is checked against its xxh3 checksum from ``index.parquet`` before it is used.
"""

from __future__ import annotations

import io
import logging
import os
from collections import defaultdict
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
import xxhash
from torch.distributed._shard._utils import narrow_tensor_by_index
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex, StorageMeta
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner, ReadItem
from torch.distributed.checkpoint.storage import StorageReader
from torch.futures import Future

from ..errors import CheckpointNotFoundError, IntegrityError
from ..index import ItemRecord
from ..keys import top_level_key
from ..manifest import CheckpointManifest
from ..safe_load import load_dcp_metadata
from .commit import CheckpointState, checkpoint_state
from .consistency import (
    ProblemKind,
    RecordFiles,
    parse_index,
    raise_if_problems,
    record_problems,
    storage_location_problems,
)
from .layout import INDEX_FILE, METADATA_FILE
from .registry import open_backend, redact_url

logger = logging.getLogger(__name__)

# What ``verify_checksums=False`` skips: comparisons of bytes with their recorded checksums.
_CHECKSUM_KINDS = (ProblemKind.CHECKSUM_MISMATCH, ProblemKind.STALE_MANIFEST)


class ForgeStorageReader(StorageReader):
    """Reads the checkpoint at ``url``. ``verify_checksums=False`` skips hashing (not recommended)."""

    def __init__(self, url: str | os.PathLike, storage_options: Mapping[str, Any] | None = None, *,
                 thread_count: int = 2, verify_checksums: bool = True) -> None:
        super().__init__()
        if not isinstance(thread_count, int) or thread_count < 1:
            raise ValueError(f"'thread_count' must be a positive int (got {thread_count!r})")
        self.storage_options = dict(storage_options or {})
        self.thread_count = thread_count
        self.verify_checksums = verify_checksums
        self.manifest: CheckpointManifest | None = None
        self.records: list[ItemRecord] = []
        self._checksums: dict[tuple[str, int], ItemRecord] = {}
        self.storage_data: dict[MetadataIndex, Any] = {}
        self.bytes_read = 0
        self.reset(url)

    # --- DCP StorageReader protocol ----------------------------------------------------------
    def reset(self, checkpoint_id: str | os.PathLike | None = None) -> None:
        if checkpoint_id is not None:
            self.url = os.fspath(checkpoint_id)
            self.backend, self.path = open_backend(self.url, self.storage_options)
        self.storage_data = {}

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike) -> bool:
        return isinstance(checkpoint_id, (str, os.PathLike))

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if kwargs.get("rank") is not None:
            raise FileNotFoundError("dcp_forge checkpoints have no per-rank metadata")
        state = checkpoint_state(self.backend, self.path)
        where = redact_url(self.url)
        if state is CheckpointState.MISSING:
            raise CheckpointNotFoundError(f"no checkpoint at {where}")
        if state is CheckpointState.PARTIAL:
            raise CheckpointNotFoundError(
                f"checkpoint {where} was never committed (a save is running or crashed); it cannot be loaded")
        if state is CheckpointState.COMMITTED:
            files = RecordFiles.read(self.backend, self.path)
            manifest, problems = record_problems(files, where)
            if not self.verify_checksums:
                problems = [p for p in problems if p.kind not in _CHECKSUM_KINDS]
            raise_if_problems(problems)
            self.manifest = manifest
            metadata_bytes = files.metadata
            self.records, problems = parse_index(files.index, where)
            raise_if_problems(problems)
            self._checksums = {r.location: r for r in self.records}
        else:  # plain DCP checkpoint: no records of ours to check against
            metadata_bytes = self._read_file(METADATA_FILE)
        metadata = load_dcp_metadata(metadata_bytes, name=f"{where}/{METADATA_FILE}")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        return metadata

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        if not isinstance(metadata.storage_data, dict):
            raise IntegrityError(f"{redact_url(self.url)}/{METADATA_FILE} has no storage locations")
        raise_if_problems(storage_location_problems(metadata, redact_url(self.url)))
        self.storage_data = metadata.storage_data

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        per_file: dict[str, dict[tuple[int, int], list[ReadItem]]] = defaultdict(lambda: defaultdict(list))
        for item in plan.items:
            info = self.storage_data[item.storage_index]
            per_file[info.relative_path][(info.offset, info.length)].append(item)
        if per_file:
            workers = min(self.thread_count, len(per_file))
            with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="forge-read") as pool:
                for f in [pool.submit(self._read_from_file, name, reads, planner)
                          for name, reads in per_file.items()]:
                    f.result()
        fut: Future[None] = Future()
        fut.set_result(None)
        return fut

    # --- helpers ----------------------------------------------------------------------------
    def _read_file(self, name: str) -> bytes:
        try:
            return self.backend.read_bytes(self.backend.join(self.path, name))
        except FileNotFoundError as err:
            raise IntegrityError(f"{redact_url(self.url)} is missing {name}") from err

    def _read_from_file(self, name: str, reads: Mapping[tuple[int, int], Sequence[ReadItem]],
                        planner: LoadPlanner) -> None:
        try:
            handle = self.backend.open_input(self.backend.join(self.path, name))
        except FileNotFoundError as err:
            fqns = sorted({r.storage_index.fqn for items in reads.values() for r in items})
            raise IntegrityError(
                f"{redact_url(self.url)}: data file {name} is missing (holds {fqns[:3]}...)") from err
        try:
            for (offset, length), items in sorted(reads.items()):
                buffer = bytearray(length)
                try:
                    handle.read_into(offset, memoryview(buffer))
                except EOFError as err:
                    raise IntegrityError(f"{redact_url(self.url)}: data file {name} is truncated "
                                         f"({err}); it holds {items[0].storage_index.fqn!r}") from err
                self.bytes_read += length
                self._verify(name, offset, buffer, items[0])
                self._apply(buffer, items, planner)
        finally:
            handle.close()

    def _verify(self, name: str, offset: int, buffer: bytearray, item: ReadItem) -> None:
        if not self.verify_checksums or not self._checksums:
            return
        record = self._checksums.get((name, offset))
        fqn = item.storage_index.fqn
        if record is None:
            raise IntegrityError(f"{redact_url(self.url)}: {name}@{offset} ({fqn!r}) is not in {INDEX_FILE}")
        found = xxhash.xxh3_64_hexdigest(buffer)
        if found != record.checksum:
            raise IntegrityError(
                f"{redact_url(self.url)}: checksum mismatch in {name} at byte {offset} for component "
                f"{record.component!r} ({fqn!r}): expected {record.checksum}, found {found}")

    @staticmethod
    def _apply(buffer: bytearray, items: Sequence[ReadItem], planner: LoadPlanner) -> None:
        if items[0].type == LoadItemType.BYTE_IO:
            for item in items:
                planner.load_bytes(item, io.BytesIO(buffer))
            return
        stored = torch.load(io.BytesIO(buffer), map_location="cpu", weights_only=True)
        for item in items:
            source = narrow_tensor_by_index(stored, item.storage_offsets, item.lengths)
            target = planner.resolve_tensor(item).detach()
            if target.size() != source.size():
                raise IntegrityError(
                    f"stored chunk of {top_level_key(item.storage_index.fqn)!r} ({item.storage_index.fqn}) "
                    f"has shape {tuple(source.size())}, destination expects {tuple(target.size())}")
            target.copy_(source)
            planner.commit_tensor(item, target)
