"""Reading small stored items together: one request for many.

On object stores every request costs a round trip and server time whatever its size, and on local
disk every read a system call: the items of a pack (format/pack.py), and small blobs stored one after
the other, are read with one request per run (``batches``) into memory, and each item is then applied
from there (``BufferInput``). Large items keep their own reads, straight into their destinations.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..format.pack import SMALL_ITEM_BYTES
from .backends import InputFile, ReadsViewsInTurn
from .item_reader import StoredRead, byte_view

# Items up to this size that lie next to each other are read together (``batches``): one request
# for many small items instead of one each; a batch holds at most BATCH_BYTES.
BATCH_ITEM_BYTES = 512 * 1024
BATCH_BYTES = 8 * 1024 * 1024


class BufferInput(ReadsViewsInTurn):
    """An ``InputFile`` over bytes already in memory: ``data`` holds, one after the other, the file's
    ``pieces`` ((offset, length) each; default: all of ``data``, stored at ``base``). A batch of small
    items read together, bytes received from another rank. ``view`` lends them without a copy."""

    def __init__(self, data: torch.Tensor, base: int = 0, pieces: Sequence[tuple[int, int]] | None = None) -> None:
        self.data = data
        self._bytes = byte_view(data) if data.numel() else memoryview(b"")
        self._pieces = list(pieces) if pieces is not None else [(base, data.numel())]
        if sum(length for _, length in self._pieces) != data.numel():
            raise ValueError(f"pieces {self._pieces} do not add up to the {data.numel()} bytes held")

    def size(self) -> int:
        return max(offset + length for offset, length in self._pieces)  # the file is at least this long

    def view(self, offset: int, length: int) -> memoryview:
        held = 0
        for start, size in self._pieces:
            if start <= offset and offset + length <= start + size and length >= 0:
                at = held + offset - start
                return self._bytes[at:at + length]
            held += size
        raise EOFError(f"bytes {offset}..{offset + length} are outside the bytes held ({self._pieces[:4]})")

    def read_into(self, offset: int, buffer: memoryview) -> None:
        source = self.view(offset, len(buffer))
        if len(buffer):
            memoryview(buffer).cast("B")[:] = source

    def prefetch(self, offset: int, length: int) -> None:
        pass  # already in memory

    def close(self) -> None:
        pass


def read_pieces(handle: InputFile, pieces: Sequence[tuple[int, int]]) -> BufferInput:
    """The file's ``pieces`` ((offset, length) each) read into memory, one after the other."""
    data = torch.empty(sum(length for _, length in pieces), dtype=torch.uint8)
    at = 0
    for offset, length in pieces:
        if length:
            handle.read_into(offset, byte_view(data[at:at + length]))
        at += length
    return BufferInput(data, pieces=pieces)


def batches(reads: Sequence[StoredRead], max_bytes: int = BATCH_BYTES) -> list[list[StoredRead]]:
    """``reads`` (in file order) as the groups read with one request each: consecutive small items of
    one file whose ranges touch or overlap (the items of a pack, small blobs written one after the
    other), up to ``max_bytes`` together; every other item alone."""
    groups: list[list[StoredRead]] = []
    start = end = -1
    for read in reads:
        small = batchable(read)
        last = groups[-1] if groups else None
        if (small and last is not None and last[-1].file == read.file and batchable(last[-1])
                and read.offset <= end and max(end, read.offset + read.length) - start <= max_bytes):
            last.append(read)
            end = max(end, read.offset + read.length)
            continue
        groups.append([read])
        start, end = read.offset, read.offset + read.length
    return groups


def batchable(read: StoredRead) -> bool:
    """Small items, read whole: the items of small packs (values, tensors up to ``SMALL_ITEM_BYTES``),
    and small blobs whose tensor is not located. A large packed tensor is read straight into place."""
    if read.gap is not None:
        return read.layout is None or read.layout.nbytes <= SMALL_ITEM_BYTES
    return read.length <= BATCH_ITEM_BYTES and read.layout is None


def span(group: Sequence[StoredRead]) -> tuple[int, int]:
    """(offset, length) of the bytes a group of reads covers."""
    start = min(r.offset for r in group)
    return start, max(r.offset + r.length for r in group) - start
