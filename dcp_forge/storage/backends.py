"""Storage backends: one small adapter per storage family, chosen by URL scheme.

Every checkpoint byte goes through a ``StorageBackend``. Writers and readers only use its methods,
so local disk, ``memory://`` and object stores share one code path and one conformance suite.

Each backend names its atomicity strategy. All of them commit a checkpoint by creating a small
``_COMMITTED`` marker exclusively, after everything else is durable (lifecycle.py):

- local disk: files are fsynced, then their directory; the marker is created with O_EXCL;
- fsspec filesystems: closing a file completes its upload; the marker is opened in mode "xb",
  which object stores implement as a conditional PUT (If-None-Match: *).
"""

from __future__ import annotations

import abc
import ctypes
import ctypes.util
import errno
import os
import posixpath
import sys
import uuid
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, Protocol

import fsspec

from ..errors import UnsafeCheckpointError

# Start writeback of just-written pages without waiting (Linux sync_file_range). Without it a
# large file sits in the page cache until fsync, and the disk idles while memory fills.
_SYNC_FILE_RANGE_WRITE = 2
_SYNC_FILE_RANGE_WAIT_BEFORE = 1
_SYNC_FILE_RANGE_WAIT_AFTER = 4


def _load_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_sync_file_range = _load_sync_file_range()


class OutputStream(Protocol):
    """A file being written. ``close`` makes it durable; ``abort`` discards it."""

    path: str

    def write(self, data: Any) -> int: ...
    def tell(self) -> int: ...
    def flush(self) -> None: ...
    def close(self) -> None: ...
    def abort(self) -> None: ...


def discard_after(out: OutputStream, error: BaseException) -> None:
    """Abort ``out`` because ``error`` broke its writing; the caller then re-raises ``error``.

    Best effort: the store that refused the write often refuses the abort too (disk gone, connection
    lost). Such a failure becomes a note on ``error``, never an exception in its place: the cause
    is what the user needs to see.
    """
    try:
        out.abort()
    except Exception as abort_error:  # noted on the cause, which the caller raises
        error.add_note(f"discarding the partly written {out.path} failed too: "
                       f"{type(abort_error).__name__}: {abort_error}")


def write_then_close(out: OutputStream, data: Any) -> None:
    """Write ``data`` to ``out`` and close it; on any failure, discard it and raise the failure."""
    try:
        out.write(data)
        out.close()
    except BaseException as err:
        discard_after(out, err)
        raise


class InputFile(Protocol):
    """A file open for random reads.

    ``read_scatter`` fills ``views`` in turn with consecutive bytes from ``offset`` (local disk: one
    ``preadv``). ``prefetch`` is a hint that a range will be read soon: a backend may start fetching
    it in the background (object stores: the small edges of upcoming blobs), or ignore it. ``size``:
    the file's length in bytes when it was opened (readers bound recorded extents by it before they
    allocate or seek).
    """

    def size(self) -> int: ...
    def read_into(self, offset: int, buffer: memoryview) -> None: ...
    def read_scatter(self, offset: int, views: Sequence[memoryview]) -> None: ...
    def prefetch(self, offset: int, length: int) -> None: ...
    def close(self) -> None: ...


class StorageBackend(abc.ABC):
    """One storage family. Paths are the backend's native paths (``fs``-style, no scheme).

    Thread-safety: every method may be called from several writer/reader threads at once.
    """

    atomicity: ClassVar[str]

    def __init__(self, fs: fsspec.AbstractFileSystem) -> None:
        self.fs = fs

    @staticmethod
    def join(base: str, *parts: str) -> str:
        return posixpath.join(base, *parts)

    # --- whole small files ---------------------------------------------------------------------
    def read_bytes(self, path: str) -> bytes:
        return self.fs.cat_file(path)

    def write_bytes(self, path: str, data: bytes) -> None:
        """Write (replace) a small file durably."""
        write_then_close(self.open_output(path), data)

    @abc.abstractmethod
    def create_exclusive(self, path: str, data: bytes) -> None:
        """Create a small file durably, or raise FileExistsError if it exists (never overwrite)."""

    # --- streams ------------------------------------------------------------------------------
    @abc.abstractmethod
    def open_output(self, path: str) -> OutputStream: ...

    @abc.abstractmethod
    def open_input(self, path: str, size: int | None = None) -> InputFile:
        """Open ``path`` for reading. ``size``: its length, when the caller knows it from a listing
        (``list_sizes``), so that a backend whose open costs a request for it (object stores) skips
        that request."""

    # --- namespace ----------------------------------------------------------------------------
    def exists(self, path: str) -> bool:
        return self.fs.exists(path)

    def makedirs(self, path: str) -> None:
        self.fs.makedirs(path, exist_ok=True)

    def list_sizes(self, path: str) -> dict[str, int]:
        """``{name: size}`` of the entries directly under ``path`` that are no directories ({} if it is
        no directory), from one listing (on object stores one request, where asking each file's size
        costs one each)."""
        try:
            if not self.fs.isdir(path):
                return {}
            entries = self.fs.ls(path, detail=True)
        except (FileNotFoundError, NotADirectoryError):
            return {}
        return file_sizes(path, entries)

    def list_dir(self, path: str, dirs_only: bool = False) -> list[str]:
        """Names (not paths) of the entries directly under ``path``; [] if it is no directory."""
        try:
            if not self.fs.isdir(path):
                return []
            entries = self.fs.ls(path, detail=True)
        except (FileNotFoundError, NotADirectoryError):
            return []
        return entry_names(path, entries, dirs_only)

    def remove(self, path: str) -> None:
        try:
            self.fs.rm_file(path)
        except FileNotFoundError:
            pass

    def remove_tree(self, path: str) -> None:
        try:
            self.fs.rm(path, recursive=True)
        except FileNotFoundError:
            pass

    def sync_dir(self, path: str) -> None:  # noqa: B027 - a no-op unless a backend has directories to sync
        """Make the directory entries of files just created durable (no-op where meaningless)."""


def file_sizes(path: str, entries: list[dict[str, Any]]) -> dict[str, int]:
    """``{name: size}`` of the files among fsspec ``ls(path, detail=True)`` entries under ``path``."""
    names = entry_names(path, [e for e in entries if e.get("type") != "directory"], dirs_only=False)
    sizes = {posixpath.basename(str(e["name"]).rstrip("/")): e.get("size") for e in entries}
    return {name: int(size) for name in names if isinstance(size := sizes.get(name), int)}


def entry_names(path: str, entries: list[dict[str, Any]], dirs_only: bool) -> list[str]:
    """Sorted names (last path segment) of the fsspec ``ls(path, detail=True)`` entries under ``path``.

    Object stores may list the directory itself: SeaweedFS leaves a ``path/`` placeholder object
    behind when everything under a prefix is deleted; it is not an entry of the directory.
    """
    own = path.rstrip("/")
    names = {posixpath.basename(str(e["name"]).rstrip("/")) for e in entries
             if str(e["name"]).rstrip("/") != own and (not dirs_only or e.get("type") == "directory")}
    return sorted(names - {""})


class _LocalOutput:
    """A local file written with overlapped writeback and fsynced on close."""

    # Every _WRITEBACK_STEP bytes written, ask the kernel to start writing them back, and wait for the
    # range _WRITEBACK_LAG steps behind: dirty memory stays bounded and the disk never idles. Large
    # writes are fed in pieces of one step, so a 256 MiB tensor does not sit in the page cache whole.
    _WRITEBACK_STEP = 32 * 1024 * 1024
    _WRITEBACK_LAG = 2

    def __init__(self, path: str, flags: int = os.O_WRONLY | os.O_CREAT | os.O_TRUNC) -> None:
        self.path = path
        self._fd = os.open(path, flags | getattr(os, "O_CLOEXEC", 0), 0o644)
        self._pos = 0
        self._flushed_to = 0
        self._waited_to = 0

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        total = len(view)
        done = 0
        while done < total:
            piece = view[done:done + self._WRITEBACK_STEP]
            written = 0
            while written < len(piece):
                written += os.write(self._fd, piece[written:])
            done += written
            self._pos += written
            self._start_writeback()
        return total

    def _start_writeback(self) -> None:
        if _sync_file_range is None:
            return
        while self._pos - self._flushed_to >= self._WRITEBACK_STEP:
            _sync_file_range(self._fd, self._flushed_to, self._WRITEBACK_STEP, _SYNC_FILE_RANGE_WRITE)
            self._flushed_to += self._WRITEBACK_STEP
            lag_end = self._flushed_to - self._WRITEBACK_LAG * self._WRITEBACK_STEP
            if lag_end > self._waited_to:
                _sync_file_range(self._fd, self._waited_to, lag_end - self._waited_to,
                                 _SYNC_FILE_RANGE_WAIT_BEFORE | _SYNC_FILE_RANGE_WRITE |
                                 _SYNC_FILE_RANGE_WAIT_AFTER)
                self._waited_to = lag_end

    def tell(self) -> int:
        return self._pos

    def flush(self) -> None:
        pass

    def close(self) -> None:
        if self._fd < 0:
            return
        fd, self._fd = self._fd, -1
        try:
            os.fdatasync(fd)
        finally:
            os.close(fd)

    def abort(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


class ReadsViewsInTurn:
    """``read_scatter`` as one ``read_into`` per view, for inputs without a vectored read."""

    def read_scatter(self, offset: int, views: Sequence[memoryview]) -> None:
        for view in views:
            view = memoryview(view).cast("B")
            if len(view):
                self.read_into(offset, view)  # type: ignore[attr-defined]
            offset += len(view)


def _open_no_follow(path: str) -> int:
    """``os.open`` for reading that refuses a symbolic link as the last path component.

    A checkpoint's files are plain files in its directory; a link there could lead a reader anywhere.
    O_NOFOLLOW makes the kernel refuse it at the open itself (no window between a check and the open).
    """
    try:
        return os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0))
    except OSError as err:
        if err.errno == errno.ELOOP and os.path.islink(path):
            raise UnsafeCheckpointError(
                f"refusing to read {path}: it is a symbolic link (to {os.readlink(path)!r}), and a checkpoint's "
                "files must be plain files inside its directory") from err
        raise


class _LocalInput:
    def __init__(self, path: str) -> None:
        self._fd = _open_no_follow(path)
        self.path = path

    def size(self) -> int:
        return os.fstat(self._fd).st_size

    def read_into(self, offset: int, buffer: memoryview) -> None:
        self.read_scatter(offset, [buffer])

    def read_scatter(self, offset: int, views: Sequence[memoryview]) -> None:
        pending = [v for v in (memoryview(v).cast("B") for v in views) if len(v)]
        while pending:
            n = os.preadv(self._fd, pending, offset)
            if n == 0:
                raise EOFError(f"{self.path} ends at byte {offset}, expected {sum(map(len, pending))} more")
            offset += n
            while n and n >= len(pending[0]):  # drop the views filled, then trim the one filled in part
                n -= len(pending.pop(0))
            if n:
                pending[0] = pending[0][n:]

    def prefetch(self, offset: int, length: int) -> None:
        # Nothing to do: each reader thread reads its file sequentially, in large requests, and the
        # kernel's own readahead keeps the disk busy between them. posix_fadvise(WILLNEED) of the
        # next range measured slower (docs/PERFORMANCE.md): its reads compete with the ones the
        # thread waits for.
        pass

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class LocalBackend(StorageBackend):
    """Local (or locally mounted) POSIX filesystem, driven with os calls for speed and durability."""

    atomicity = "commit marker created with O_EXCL after fsync of every file and directory"

    @staticmethod
    def join(base: str, *parts: str) -> str:
        return os.path.join(base, *parts)

    def read_bytes(self, path: str) -> bytes:
        with open(_open_no_follow(path), "rb") as f:
            return f.read()

    def create_exclusive(self, path: str, data: bytes) -> None:
        # Write and fsync a private temporary file, then hard-link it to the final name: link()
        # fails if the name exists (exclusive) and the name never points at a partly written file.
        # Creating the final name with O_EXCL and writing into it instead would leave an empty
        # marker behind if the process is killed between the two steps (a "committed" checkpoint
        # whose marker cannot be read).
        directory, name = os.path.split(path)
        temporary = os.path.join(directory, f".{name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
        out = _LocalOutput(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        try:
            out.write(data)
            out.close()
            try:
                os.link(temporary, path)
            except FileExistsError:
                raise
            except OSError:  # a filesystem without hard links: fall back to O_EXCL on the final name
                self._create_exclusive_in_place(path, data)
        except BaseException as err:
            discard_after(out, err)  # closes if still open, and removes the temporary name
            raise
        out.abort()  # the name is linked: the temporary one goes
        self.sync_dir(directory)

    @staticmethod
    def _create_exclusive_in_place(path: str, data: bytes) -> None:
        write_then_close(_LocalOutput(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL), data)

    def open_output(self, path: str) -> OutputStream:
        return _LocalOutput(path)

    def open_input(self, path: str, size: int | None = None) -> InputFile:
        return _LocalInput(path)  # the size comes with the open file (fstat), for free

    def exists(self, path: str) -> bool:
        return os.path.exists(path)

    def makedirs(self, path: str) -> None:
        os.makedirs(path, exist_ok=True)

    def list_dir(self, path: str, dirs_only: bool = False) -> list[str]:
        try:
            with os.scandir(path) as entries:
                return sorted(e.name for e in entries if not dirs_only or e.is_dir())
        except (FileNotFoundError, NotADirectoryError):
            return []

    def list_sizes(self, path: str) -> dict[str, int]:
        try:
            with os.scandir(path) as entries:
                # every entry but directories, links too: opening one refuses it (O_NOFOLLOW) with a clear error
                return {e.name: e.stat(follow_symlinks=False).st_size for e in entries
                        if not e.is_dir(follow_symlinks=False)}
        except (FileNotFoundError, NotADirectoryError):
            return {}

    def remove(self, path: str) -> None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass

    def sync_dir(self, path: str) -> None:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class _FsspecOutput:
    def __init__(self, fs: fsspec.AbstractFileSystem, path: str, mode: str = "wb") -> None:
        self._fs = fs
        self.path = path
        self._file = fs.open(path, mode)
        self._pos = 0

    def write(self, data: Any) -> int:
        nbytes = memoryview(data).nbytes
        self._file.write(data)
        self._pos += nbytes
        return nbytes

    def tell(self) -> int:
        return self._pos

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self._file.close()  # completes the upload on object stores

    def abort(self) -> None:
        discard = getattr(self._file, "discard", None)
        if callable(discard):
            discard()  # aborts a multipart upload
        else:
            try:
                self._file.close()
            finally:
                try:
                    self._fs.rm_file(self.path)
                except FileNotFoundError:
                    pass


def read_upto(file: Any, offset: int, view: memoryview) -> int:
    """Fill ``view`` from ``offset`` of a seekable file object (Python or Arrow) with as many
    ``readinto`` calls as it takes; returns the bytes read, fewer only where the file ends."""
    file.seek(offset)
    done = 0
    while done < len(view):
        n = file.readinto(view[done:])
        if not n:
            break
        done += n
    return done


def read_exactly(file: Any, path: str, offset: int, view: memoryview) -> None:
    """``read_upto``, with EOFError naming ``path`` when the file ends before ``view`` is full."""
    done = read_upto(file, offset, view)
    if done < len(view):
        raise EOFError(f"{path} ends at byte {offset + done}, expected {len(view) - done} more")


class _FsspecInput(ReadsViewsInTurn):
    def __init__(self, fs: fsspec.AbstractFileSystem, path: str, size: int | None = None) -> None:
        # fsspec's buffered files take a known size instead of asking for it (a HEAD on object stores)
        self._file = fs.open(path, "rb") if size is None else fs.open(path, "rb", size=size)
        self.path = path

    def size(self) -> int:
        size = getattr(self._file, "size", None)  # fsspec's buffered files know it from opening
        if isinstance(size, int):
            return size
        return int(self._file.seek(0, os.SEEK_END))

    def read_into(self, offset: int, buffer: memoryview) -> None:
        read_exactly(self._file, self.path, offset, memoryview(buffer).cast("B"))

    def prefetch(self, offset: int, length: int) -> None:
        pass  # fsspec files read ahead on their own (block caches)

    def close(self) -> None:
        self._file.close()


class FsspecBackend(StorageBackend):
    """Any fsspec filesystem (memory://, object stores, ...)."""

    atomicity = "commit marker opened in mode 'xb' (a conditional PUT on object stores)"

    def create_exclusive(self, path: str, data: bytes) -> None:
        write_then_close(_FsspecOutput(self.fs, path, "xb"), data)

    def open_output(self, path: str) -> OutputStream:
        return _FsspecOutput(self.fs, path)

    def open_input(self, path: str, size: int | None = None) -> InputFile:
        return _FsspecInput(self.fs, path)
