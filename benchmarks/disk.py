"""The local disk's own limits, measured in the same run as the contenders they are compared with.

The disk of a shared VM is noisy (the same 1 GiB write takes 0.4 s one minute and 1.6 s the next),
so a ratio is only meaningful against a limit measured moments before, with the same bytes.

- durable write limit: ``streams`` threads each ``os.write`` their share, then ``fsync`` — what a
  checkpoint writer could reach with no serialisation, hashing or planning at all;
- cold-read limit: the same files read back by ``streams`` threads with ``preadv`` straight into
  their destination, after their pages were dropped from the page cache.

Both move the caller's own tensors (no extra gigabyte of scratch memory).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import mmap
import os
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

_PIECE = 64 * 1024 * 1024


def _byte_view(tensor: torch.Tensor) -> memoryview:
    """The tensor's bytes, writable, without a copy (contiguous CPU tensors only)."""
    if tensor.device.type != "cpu" or not tensor.is_contiguous():
        raise ValueError(f"expected a contiguous CPU tensor (got device={tensor.device}, "
                         f"contiguous={tensor.is_contiguous()})")
    return tensor.view(torch.uint8).reshape(-1).numpy().data


def drop_page_cache(path: str) -> int:
    """Evict ``path`` (a file, or every file under a directory) from the page cache; returns bytes.

    Uses ``posix_fadvise(DONTNEED)``, which only evicts clean pages: call it after the files were
    fsynced. It leaves the rest of the machine's cache alone (unlike /proc/sys/vm/drop_caches).
    """
    files = [path] if os.path.isfile(path) else [
        os.path.join(root, name) for root, _, names in os.walk(path) for name in names]
    total = 0
    for name in files:
        fd = os.open(name, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            total += os.fstat(fd).st_size
        finally:
            os.close(fd)
    return total


@functools.cache
def _mincore() -> Callable[[int, int, Any], int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.mincore
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    fn.restype = ctypes.c_int
    return fn


def resident_bytes(path: str) -> int | None:
    """Bytes of ``path`` (a file, or every file under a directory) now in the page cache (mincore).

    Lets a benchmark show that its "cold" reads start cold: ``drop_page_cache`` is only advice, and
    some filesystems (tmpfs) keep every page. None where mincore is unavailable.
    """
    mincore = _mincore()
    if mincore is None:
        return None
    files = [path] if os.path.isfile(path) else [
        os.path.join(root, name) for root, _, names in os.walk(path) for name in names]
    total = 0
    for name in files:
        size = os.path.getsize(name)
        if not size:
            continue
        with open(name, "rb") as f, mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ) as mapped:
            view = np.frombuffer(mapped, dtype=np.uint8)  # only for the mapping's address
            pages = ctypes.create_string_buffer((size + mmap.PAGESIZE - 1) // mmap.PAGESIZE)
            if mincore(view.ctypes.data, size, pages) != 0:
                raise OSError(ctypes.get_errno(), f"mincore failed on {name}")
            del view  # the mapping cannot close while an array exports it
            total += min(size, sum(b & 1 for b in pages.raw) * mmap.PAGESIZE)
    return total


def split_by_bytes(tensors: Sequence[torch.Tensor], parts: int) -> list[list[torch.Tensor]]:
    """Tensors dealt into ``parts`` lists of about equal bytes (largest first onto the lightest)."""
    bins: list[list[torch.Tensor]] = [[] for _ in range(parts)]
    loads = [0] * parts
    for t in sorted(tensors, key=lambda t: t.nbytes, reverse=True):
        i = loads.index(min(loads))
        bins[i].append(t)
        loads[i] += t.nbytes
    return bins


def _pieces(tensors: Sequence[torch.Tensor]) -> Iterator[memoryview]:
    """The tensors' bytes in file order, in pieces of at most ``_PIECE`` (one syscall each)."""
    for t in tensors:
        view = _byte_view(t)
        for start in range(0, len(view), _PIECE):
            yield view[start:start + _PIECE]


def _write_all(fd: int, tensors: Sequence[torch.Tensor]) -> None:
    for piece in _pieces(tensors):
        done = 0
        while done < len(piece):
            done += os.write(fd, piece[done:])


def _write_stream(path: str, tensors: Sequence[torch.Tensor]) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        _write_all(fd, tensors)
        os.fsync(fd)
    finally:
        os.close(fd)


def recycle_page_cache(directory: str, tensors: Sequence[torch.Tensor]) -> None:
    """Write ``tensors`` to a scratch file under ``directory`` and delete it unsynced, so that the
    next write of as many bytes fills page-cache pages the kernel has just freed.

    On a VM whose memory the host backs lazily or takes back (free page reporting, DAMON reclaim),
    the first use of a guest page costs a hypervisor fault: writing 1 GiB into such pages took ~3 s of
    system time here, against ~0.4 s into pages just freed, whatever the writer. The durable-write
    limit always wrote into the pages of its own previous files, deleted just before; recycling
    before every timed save gives each contender that same start.
    """
    path = os.path.join(directory, ".recycle.bin")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        _write_all(fd, tensors)
    finally:
        os.close(fd)
        os.unlink(path)  # its dirty pages are dropped, not written back


def _read_stream(path: str, tensors: Sequence[torch.Tensor]) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        offset = 0
        for piece in _pieces(tensors):
            done = 0
            while done < len(piece):
                n = os.preadv(fd, [piece[done:]], offset)
                if n == 0:
                    raise EOFError(f"{path} ended at byte {offset}")
                done += n
                offset += n
    finally:
        os.close(fd)


def durable_write_limit(directory: str, tensors: Sequence[torch.Tensor], streams: int = 2) -> float:
    """Seconds to write ``tensors`` durably as ``streams`` parallel files under ``directory``.

    The files stay (``raw_<i>.bin``) so ``cold_read_limit`` can read them back.
    """
    os.makedirs(directory, exist_ok=True)
    bins = split_by_bytes(tensors, streams)
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=streams) as pool:
        for f in [pool.submit(_write_stream, os.path.join(directory, f"raw_{i}.bin"), b)
                  for i, b in enumerate(bins)]:
            f.result()
    return time.perf_counter() - started


def cold_read_limit(directory: str, tensors: Sequence[torch.Tensor], streams: int = 2) -> float:
    """Seconds to read the files of ``durable_write_limit`` back into ``tensors`` from a cold cache.

    ``tensors`` must have the same sizes, in the same order, as the ones written.
    """
    bins = split_by_bytes(tensors, streams)
    drop_page_cache(directory)
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=streams) as pool:
        for f in [pool.submit(_read_stream, os.path.join(directory, f"raw_{i}.bin"), b)
                  for i, b in enumerate(bins)]:
            f.result()
    return time.perf_counter() - started
