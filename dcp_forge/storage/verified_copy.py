"""Copying a checkpoint's data files from one copy to another, checking every item on the way.

A tiered checkpoint's files travel twice after they were written: to peer nodes (peer copies of the
local tier) and to the remote tier (the drain). Both check the bytes as they stream past against the
checksums ``index.parquet`` recorded when the items were written, and make the new file durable
(``OutputStream.close``) only once every item of it matched and the file has exactly the length the
index gives it: a copy never becomes durable with a byte that differs from what was saved.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import xxhash

from ..errors import IntegrityError
from ..format.index import ItemRecord
from ..format.names import INDEX_FILE
from .backends import InputFile, OutputStream, discard_after

COPY_CHUNK_BYTES = 16 * 1024 * 1024


def file_sizes(records: Iterable[ItemRecord]) -> dict[str, int]:
    """Every data file the index names, with its length: where its last item ends."""
    sizes: dict[str, int] = {}
    for r in records:
        sizes[r.file] = max(sizes.get(r.file, 0), r.offset + r.length)
    return dict(sorted(sizes.items()))


def rows_by_file(records: Iterable[ItemRecord]) -> dict[str, list[ItemRecord]]:
    """The index rows of each data file, in file order."""
    out: dict[str, list[ItemRecord]] = {}
    for r in records:
        out.setdefault(r.file, []).append(r)
    return {name: sorted(rows, key=lambda r: r.offset) for name, rows in sorted(out.items())}


class ItemVerifier:
    """Checks the bytes of data file ``name``, fed in order from byte 0, against its index ``rows``.

    Every item's checksum covers the bytes it owns (a packed item's head and trailer, with other items
    in between), and no byte is owned twice. ``update`` raises IntegrityError as soon as an item's
    last piece went by and its bytes hash to anything but its recorded xxh3; ``finish`` raises unless
    exactly ``size`` bytes came and every item was checked. ``where`` names the copy being read.
    """

    def __init__(self, where: str, name: str, rows: Sequence[ItemRecord], size: int) -> None:
        self.where, self.name, self.size = where, name, size
        self._rows = list(rows)
        # (start, length, row), zero-length pieces before the piece that starts where they are
        self._pieces = sorted((start, length, i) for i, row in enumerate(self._rows)
                              for start, length in row.pieces)
        for (s1, l1, r1), (s2, _, r2) in zip(self._pieces, self._pieces[1:], strict=False):
            if s1 + l1 > s2:
                raise IntegrityError(f"{where}/{INDEX_FILE}: items of {name} overlap ({self._rows[r1].fqn!r} "
                                     f"at byte {s1} and {self._rows[r2].fqn!r} at byte {s2})")
        end = max((start + length for start, length, _ in self._pieces), default=0)
        if end > size:
            raise IntegrityError(f"{where}: {name} should have {size} bytes, but {INDEX_FILE} records an item "
                                 f"ending at byte {end}")
        self._left = [0] * len(self._rows)  # pieces of each item not yet seen
        for _, _, i in self._pieces:
            self._left[i] += 1
        self._pos = 0
        self._next = 0  # index of the first piece not yet seen
        self._checked = 0
        self._hashers: dict[int, xxhash.xxh3_64] = {}

    def update(self, data: memoryview | bytes) -> None:
        view = memoryview(data).cast("B")
        if self._pos + len(view) > self.size:
            raise IntegrityError(f"{self.where}: {self.name} is longer than the {self.size} bytes {INDEX_FILE} "
                                 "records in it")
        while len(view):
            if self._next >= len(self._pieces):
                self._pos += len(view)
                return
            start, length, row = self._pieces[self._next]
            if self._pos < start:  # bytes no item owns: nothing vouches for them, nothing reads them
                step = min(start - self._pos, len(view))
            else:
                step = min(start + length - self._pos, len(view))
                self._hashers.setdefault(row, xxhash.xxh3_64()).update(view[:step])
            view = view[step:]
            self._pos += step
            if self._pos == start + length:
                self._piece_done(row)

    def _piece_done(self, row: int) -> None:
        self._next += 1
        self._left[row] -= 1
        if self._left[row]:
            return
        found = self._hashers.pop(row, xxhash.xxh3_64()).hexdigest()
        self._checked += 1
        record = self._rows[row]
        if found != record.checksum:
            raise IntegrityError(
                f"{self.where}: checksum mismatch in {self.name} at byte {record.offset} for component "
                f"{record.component!r} ({record.fqn!r}): expected {record.checksum}, found {found}")

    def finish(self) -> None:
        while self._next < len(self._pieces) and self._pieces[self._next][1] == 0 \
                and self._pieces[self._next][0] == self._pos:
            self._piece_done(self._pieces[self._next][2])  # empty pieces at the very end
        if self._pos != self.size or self._checked != len(self._rows):
            raise IntegrityError(f"{self.where}: {self.name} has {self._pos} bytes, {INDEX_FILE} records "
                                 f"{self.size} (items checked: {self._checked} of {len(self._rows)})")


def copy_verified(source: InputFile, out: OutputStream, verifier: ItemVerifier,
                  chunk_bytes: int = COPY_CHUNK_BYTES) -> int:
    """Stream ``verifier.size`` bytes from ``source`` into ``out``, checking them; close ``out`` (durable)
    only once they all checked out, else discard it and raise. Returns the bytes copied."""
    buffer = bytearray(min(chunk_bytes, max(1, verifier.size)))
    done = 0
    try:
        if source.size() != verifier.size:
            raise IntegrityError(f"{verifier.where}: {verifier.name} has {source.size()} bytes, {INDEX_FILE} "
                                 f"records {verifier.size}")
        while done < verifier.size:
            view = memoryview(buffer)[:min(len(buffer), verifier.size - done)]
            source.read_into(done, view)
            verifier.update(view)
            out.write(view)
            done += len(view)
        verifier.finish()
        out.close()
    except BaseException as err:
        discard_after(out, err)
        raise
    return done

