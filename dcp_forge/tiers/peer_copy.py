"""Peer copies: each rank's local-tier data files, streamed over gloo into other nodes' local tiers.

Call protocol: every rank of ``group`` calls ``copy_to_peers`` with the same ``transfers`` (one per
data file and partner, ``layout.peer_transfers``), after every rank's files are durable in its node
copy. Each rank streams its own files in pieces of ``chunk_bytes``; piece ``w`` of every sender
travels in wave ``w`` (tag ``w``) to each of its partners, so every rank posts all its sends and
receives of a wave before it waits for them and no two ranks can wait on each other. A partner writes
each piece into the same file name in its own node copy, checks every item against the index as the
bytes arrive (``storage.verified_copy.ItemVerifier``) and makes the file durable only once the whole
file checked out. A rank that fails (reading, writing, a checksum) keeps taking part in every wave, so
nobody waits forever, and returns its failure; the caller agrees on failures across ranks.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..collectives import irecv, isend
from ..format.index import ItemRecord
from ..storage import COPY_CHUNK_BYTES, InputFile, ItemVerifier, OutputStream, StorageBackend, discard_after
from .layout import Transfer

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Piece:
    """Bytes ``offset .. offset + length`` of data file ``file``, sent by ``src`` to each of ``dsts``."""

    src: int
    file: str
    offset: int
    length: int
    file_size: int
    dsts: tuple[int, ...]

    @property
    def last(self) -> bool:
        return self.offset + self.length == self.file_size


def pieces_by_sender(transfers: Sequence[Transfer], chunk_bytes: int = COPY_CHUNK_BYTES) -> dict[int, list[Piece]]:
    """Each sender's pieces in the order it sends them (its files by name, each from byte 0). A file
    of 0 bytes is one empty piece, so its partners still create it."""
    dsts: dict[tuple[int, str, int], list[int]] = defaultdict(list)
    for t in transfers:
        dsts[(t.src, t.file, t.size)].append(t.dst)
    out: dict[int, list[Piece]] = defaultdict(list)
    for (src, name, size), targets in sorted(dsts.items()):
        starts = range(0, size, chunk_bytes) if size else [0]
        out[src].extend(Piece(src, name, start, min(chunk_bytes, size - start), size, tuple(sorted(targets)))
                        for start in starts)
    return dict(out)


@dataclasses.dataclass
class PeerCopyStats:
    bytes_sent: int = 0
    bytes_received: int = 0
    seconds: float = 0.0


class _Receiving:
    """The files this rank is receiving, each streamed into its output and checked as it goes."""

    def __init__(self, backend: StorageBackend, path: str, rows: Mapping[str, Sequence[ItemRecord]],
                 where: str) -> None:
        self.backend, self.path, self.rows, self.where = backend, path, rows, where
        self._open: dict[str, tuple[OutputStream, ItemVerifier]] = {}
        self.failure: BaseException | None = None

    def accept(self, piece: Piece, data: torch.Tensor) -> None:
        if self.failure is not None:
            return  # keep receiving (the senders must not block), stop writing
        try:
            if piece.offset == 0:
                out = self.backend.open_output(self.backend.join(self.path, piece.file))
                self._open[piece.file] = (out, ItemVerifier(f"{self.where} (peer copy from rank {piece.src})",
                                                            piece.file, self.rows.get(piece.file, ()),
                                                            piece.file_size))
            out, verifier = self._open[piece.file]
            view = data.numpy().data.cast("B")
            try:
                verifier.update(view)
                out.write(view)
                if piece.last:
                    verifier.finish()
                    del self._open[piece.file]
                    out.close()
            except BaseException as err:
                self._open.pop(piece.file, None)
                discard_after(out, err)
                raise
        except Exception as err:  # reported once every wave is done
            self.failure = err
            self.abort()

    def abort(self) -> None:
        for name, (out, _) in list(self._open.items()):
            del self._open[name]
            try:
                out.abort()
            except Exception:  # the failure that got us here is the one reported
                logger.debug("discarding the partly received %s failed", name, exc_info=True)


def copy_to_peers(transfers: Sequence[Transfer], me: int, group: Any, backend: StorageBackend, path: str,
                  rows: Mapping[str, Sequence[ItemRecord]], where: str,
                  chunk_bytes: int = COPY_CHUNK_BYTES) -> tuple[PeerCopyStats, BaseException | None]:
    """Send this rank's files to its partners and receive its partners' files into ``path`` (this rank's
    node copy, on ``backend``). ``rows``: the index rows of each data file. Returns what moved and the
    first failure on this rank (None: every file it received is durable and checked)."""
    started = time.perf_counter()
    stats = PeerCopyStats()
    senders = pieces_by_sender(transfers, chunk_bytes)
    mine = senders.get(me, [])
    incoming = {src: pieces for src, pieces in senders.items() if src != me and any(me in p.dsts for p in pieces)}
    waves = max([len(mine), *(len(p) for p in incoming.values())], default=0)
    receiving = _Receiving(backend, path, rows, where)
    send_failure: BaseException | None = None
    handles: dict[str, InputFile] = {}
    try:
        for wave in range(waves):
            sends = []
            if wave < len(mine):
                piece = mine[wave]
                payload = torch.empty(piece.length, dtype=torch.uint8)
                if send_failure is None:
                    try:
                        handle = handles.get(piece.file)
                        if handle is None:
                            handle = handles[piece.file] = backend.open_input(backend.join(path, piece.file))
                        if piece.length:
                            handle.read_into(piece.offset, payload.numpy().data)
                    except Exception as err:  # the partners still get a payload (and fail its checksum)
                        send_failure = err
                if piece.length:  # an empty file's one piece carries nothing: its partners create it
                    sends = [isend(payload, group, dst, wave) for dst in piece.dsts]
                stats.bytes_sent += piece.length * len(piece.dsts)
            received = []
            for src, pieces in sorted(incoming.items()):
                if wave < len(pieces) and me in pieces[wave].dsts:
                    data = torch.empty(pieces[wave].length, dtype=torch.uint8)
                    work = irecv(data, group, src, wave) if pieces[wave].length else None
                    received.append((pieces[wave], data, work))
            for piece, data, work in received:
                if work is not None:
                    work.wait()
                stats.bytes_received += piece.length
                receiving.accept(piece, data)
            for work in sends:
                work.wait()
    finally:
        for handle in handles.values():
            handle.close()
        receiving.abort()
    stats.seconds = time.perf_counter() - started
    return stats, send_failure or receiving.failure
