"""Arrow's C++ S3 client as the data path: multipart uploads we cut into parts, parallel ranged reads.

``S3Backend`` (s3.py) hands data files to these streams when its data client is Arrow. Both sides
were sized with ``benchmarks/s3.py`` against SeaweedFS (docs/PERFORMANCE.md, "Object storage (s3://)").

Uploads: every part but the last is ``PART_BYTES`` (16 MiB), doubling every 1000 parts so that
S3's 10,000-part limit is never reached; at most ``MAX_PARTS_IN_FLIGHT`` parts per stream are held
(filling or uploading), so a rank holds at most thread_count x 8 x 16 MiB of part buffers; Arrow's
io threads (``pyarrow.io_thread_count()``, 8 by default) upload them in parallel.

Reads: straight into the destination (``readinto``), large reads as parallel ranges, and the small
header/trailer reads of upcoming items fetched in the background (``prefetch``).
"""

from __future__ import annotations

import contextlib
import functools
import queue
import re
import threading
import weakref
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from .backends import ReadsViewsInTurn, read_exactly

# Multipart parts of 16 MiB: big enough that per-request costs vanish, small enough that each
# writer stream keeps several uploads in flight.
PART_BYTES = 16 * 2**20
# Parts held (filling or uploading) per stream: bounds memory to thread_count x 8 x 16 MiB a rank.
MAX_PARTS_IN_FLIGHT = 8
# Reads of 2 x RANGE_BYTES or more are split into parallel ranges of at most RANGE_BYTES, fetched
# on RANGE_THREADS threads shared by the process. Ranges of 4 MiB were slower than 16 MiB here.
RANGE_BYTES = 16 * 2**20
RANGE_THREADS = 8
# ``prefetch`` fetches this much at both ends of an upcoming item (the reader reads a stored tensor's
# zip header and trailer, 4 KiB each, before its data), and items this small whole, in the background.
EDGE_WINDOW = 64 * 2**10
MAX_PART_BYTES = 5 * 2**30  # S3's limit
# How Arrow words an error of the SDK's transport (after its retries): connection refused, reset,
# timed out. Any other error is an answer of the server.
_TRANSPORT_ERROR = re.compile(r"AWS Error (NETWORK_CONNECTION|REQUEST_TIMEOUT)\b")


@contextlib.contextmanager
def connection_errors() -> Iterator[None]:
    """Arrow's transport failures as the builtin ``ConnectionError`` (s3fs's path raises it too).

    Arrow raises every S3 failure as a plain ``OSError`` without errno, quoting the SDK's error, so
    callers could not tell a lost connection from a refusal. The message (it names bucket and key)
    stays as it is.
    """
    try:
        yield
    except ConnectionError:
        raise
    except OSError as err:
        if err.errno is None and _TRANSPORT_ERROR.search(str(err)):
            raise ConnectionError(str(err)) from err
        raise


class ArrowOutput:
    """An object being uploaded by Arrow: parts go out in the background while we keep writing.

    We cut the parts ourselves instead of handing Arrow the caller's writes: Arrow uploads a write
    of 5 MiB or more as one part of that size (a 6 GiB tensor would be one part, above S3's 5 GiB
    limit, and a one-tensor file would get no parallelism at all), and it buffers without limit
    while parts upload (a fast writer would hold the whole file in memory). Here every part but the
    last is ``part_bytes`` (``part_size``), at most ``max_in_flight`` of them are held per stream
    (write blocks until an upload finishes), and each part is a copy: the caller's buffers may be
    temporaries (torch's zip writer hands out views of memory it frees), so Arrow must not keep
    views of them after ``write`` returns.
    """

    def __init__(self, arrow_fs: Any, path: str, part_bytes: int = PART_BYTES,
                 max_in_flight: int = MAX_PARTS_IN_FLIGHT) -> None:
        self._arrow_fs = arrow_fs
        self.path = path
        with connection_errors():
            self._file = arrow_fs.open_output_stream(path, metadata={})
        self._pos = 0
        self._parts = 0
        self._part_bytes = part_bytes
        self._part: Any = None  # numpy uint8 view of the part buffer being filled
        self._fill = 0
        # Part buffers come from Arrow's memory pool and are reused: a buffer returns to ``_free``
        # when Arrow drops the numpy view it uploaded (the upload finished or failed); numpy arrays
        # support weak references, Arrow's buffers do not. At most ``max_in_flight`` exist.
        self._free: queue.SimpleQueue = queue.SimpleQueue()
        self._buffers = 0
        self._max_buffers = max_in_flight

    def write(self, data: Any) -> int:
        with connection_errors():  # a part that failed in the background raises at the next write
            return self._write(data)

    def _write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        done = 0
        while done < len(view):
            if self._part is None:
                self._part = self._new_part()
                self._fill = 0
            take = min(len(view) - done, len(self._part) - self._fill)
            memoryview(self._part)[self._fill:self._fill + take] = view[done:done + take]
            self._fill += take
            done += take
            if self._fill == len(self._part):
                self._send()
        self._pos += len(view)
        return len(view)

    def _new_part(self) -> Any:
        import numpy as np
        import pyarrow as pa

        size = part_size(self._parts, self._part_bytes)
        buffer = None
        while buffer is None:
            if self._buffers < self._max_buffers:
                try:
                    buffer = self._free.get_nowait()
                except queue.Empty:
                    buffer = pa.allocate_buffer(size)
                    self._buffers += 1
            else:
                buffer = self._free.get()  # blocks until an upload finishes
            if buffer.size != size:  # the part size grew: let this one go
                buffer = None
                self._buffers -= 1
        part = np.frombuffer(buffer, dtype=np.uint8)
        weakref.finalize(part, self._free.put, buffer)
        return part

    def _send(self) -> None:
        part, fill = self._part, self._fill
        self._part, self._fill = None, 0
        self._parts += 1
        # Arrow uploads a write of >= 5 MiB without copying it, on its io threads (background_writes).
        self._file.write(part if fill == len(part) else part[:fill])

    def tell(self) -> int:
        return self._pos

    def flush(self) -> None:
        pass

    def close(self) -> None:
        with connection_errors():
            if self._part is not None and self._fill:
                self._send()
            self._part = None
            self._file.close()  # waits for the parts and completes the upload

    def abort(self) -> None:
        # pyarrow exposes no abort of a multipart upload: complete it, then delete the object. The
        # checkpoint it belongs to has no commit marker, so it was never visible either way.
        # Completing fails after a failed write (that is why we abort); a failing delete raises, for
        # the caller to note beside the error that made it abort.
        self._part = None
        with contextlib.suppress(OSError):
            self._file.close()
        with contextlib.suppress(FileNotFoundError), connection_errors():
            self._arrow_fs.delete_file(self.path)


def part_size(index: int, part_bytes: int = PART_BYTES) -> int:
    """Size of part ``index`` (0-based) of an upload: ``part_bytes``, doubling every 1000 parts.

    S3 allows 10,000 parts of at most 5 GiB: 16 MiB parts alone would cap an object at ~156 GiB,
    with the doubling 10,000 parts reach ~16 TiB while files of normal size keep small parts.
    Arrow's writer (in the C++ source we read; not measured with pyarrow 26) also raises its own
    minimum part size by 5 MiB every 100 parts; from part ~300 (~5 GB into an object) that exceeds
    16 MiB and Arrow joins our writes into larger parts (one more copy): slower for such objects,
    still within S3's limits.
    """
    return min(part_bytes << (index // 1000), MAX_PART_BYTES)


class ArrowInput(ReadsViewsInTurn):
    """Ranged GETs straight into the destination buffer (``readinto``, no intermediate bytes).

    A read of ``2 * RANGE_BYTES`` or more is split into ranges (``range_step``) fetched in parallel
    (one GET each, on the shared range pool, each thread with a handle of its own), so one large
    tensor is not one long GET. ``prefetch`` fetches the ends of upcoming items in the background,
    so the small reads of a blob's header and trailer do not wait for a round trip each.
    """

    def __init__(self, arrow_fs: Any, path: str, range_bytes: int = RANGE_BYTES) -> None:
        self._arrow_fs = arrow_fs
        with connection_errors():
            self._file = arrow_fs.open_input_file(path)
        self.path = path
        self._range_bytes = range_bytes
        self._spare: list[Any] = []  # idle extra handles for parallel ranges
        self._lock = threading.Lock()
        self._windows: dict[tuple[int, int], Future] = {}  # (start, end) -> bytes being prefetched

    def size(self) -> int:
        return self._file.size()

    def read_into(self, offset: int, buffer: memoryview) -> None:
        with connection_errors():
            self._read_into(offset, buffer)

    def _read_into(self, offset: int, buffer: memoryview) -> None:
        view = memoryview(buffer).cast("B")
        if len(view) <= 2 * EDGE_WINDOW and self._from_window(offset, view):
            return
        step = range_step(len(view), self._range_bytes)
        if step >= len(view):
            read_exactly(self._file, self.path, offset, view)
            return
        futures = [_range_pool().submit(self._read_range, offset + start, view[start:start + step])
                   for start in range(0, len(view), step)]
        for f in futures:  # every future is awaited before the first error is raised
            f.exception()
        for f in futures:
            f.result()

    def _read_range(self, offset: int, view: memoryview) -> None:
        handle = self._handle()
        try:
            read_exactly(handle, self.path, offset, view)
        finally:
            self._give_back(handle)

    def _handle(self) -> Any:
        with self._lock:
            handle = self._spare.pop() if self._spare else None
        return handle if handle is not None else self._arrow_fs.open_input_file(self.path)

    def _give_back(self, handle: Any) -> None:
        with self._lock:
            self._spare.append(handle)

    def prefetch(self, offset: int, length: int) -> None:
        # Called by one reader thread, in file order, for the items it will read next. A large
        # item's tail window runs on into the next item, whose header it then already holds: one
        # small GET per item instead of two.
        end = offset + length
        if length <= 2 * EDGE_WINDOW:
            wanted = [(offset, end)]
        else:
            wanted = [(offset, offset + EDGE_WINDOW), (end - EDGE_WINDOW, end + EDGE_WINDOW)]
        for start, stop in wanted:
            if self._window_for(start, min(stop, end)) is None:
                self._windows[(start, stop)] = _range_pool().submit(self._fetch, start, stop - start)

    def _fetch(self, offset: int, length: int) -> bytes:
        """Up to ``length`` bytes at ``offset``; fewer where the object ends."""
        # read_at is positional (thread-safe beside the reading thread's seek + readinto on the same
        # handle), so windows need no handle of their own: opening one costs a HEAD request.
        length = min(length, self._file.size() - offset)
        return bytes(self._file.read_at(length, offset)) if length > 0 else b""

    def _window_for(self, offset: int, end: int, evict: bool = False) -> tuple[int, Future] | None:
        """The window holding bytes [offset, end); ``evict`` (on reads, which go forward through the
        file) drops the windows that end before ``offset``."""
        hit = None
        for (start, stop), future in list(self._windows.items()):
            if start <= offset and end <= stop:
                hit = (start, future)
            elif evict and stop <= offset:
                del self._windows[(start, stop)]
        return hit

    def _from_window(self, offset: int, view: memoryview) -> bool:
        """Serve a small read from a prefetched window, if one holds it."""
        end = offset + len(view)
        hit = self._window_for(offset, end, evict=True)
        if hit is None:
            return False
        start, future = hit
        try:
            data = future.result()
        except OSError:
            return False  # read it directly: that read raises with its own context
        if len(data) < end - start:
            return False  # past the end of the object: the direct read raises EOFError
        view[:] = memoryview(data)[offset - start:end - start]
        return True

    def close(self) -> None:
        windows, self._windows = self._windows, {}
        for future in windows.values():
            future.cancel()
            with contextlib.suppress(BaseException):
                future.exception()  # never leave a fetch running on a handle being closed
        self._file.close()
        with self._lock:
            spare, self._spare = self._spare, []
        for handle in spare:
            handle.close()


def range_step(length: int, range_bytes: int = RANGE_BYTES) -> int:
    """Bytes per parallel range for a read of ``length``: the whole read below ``2 * range_bytes``,
    else equal ranges of at most ``range_bytes`` (smaller ranges only add requests: measured)."""
    if length < 2 * range_bytes:
        return max(length, 1)
    return -(-length // -(-length // range_bytes))


@functools.lru_cache(maxsize=1)
def _range_pool() -> ThreadPoolExecutor:
    # Shared by every reader of the process, so parallel ranges never multiply with reader threads
    # into hundreds of connections; its tasks never wait on each other (no deadlock).
    return ThreadPoolExecutor(max_workers=RANGE_THREADS, thread_name_prefix="forge-s3-range")
