"""Upload in a process of its own: the training process stages, another one serializes, writes and commits.

With ``AsyncOptions(upload="process")`` the background half of an async save (DCP's planning,
serializing every item, hashing, writing, the commit) runs in an *upload process* per rank, off the
training process's GIL. What travels, and how:

- Staging buffers live in shared memory (``SharedArenas``: Linux ``memfd`` files cut into buffers,
  mapped by both processes), so the staged tensors reach the upload process without another copy:
  a request pickles the staged state dict with every tensor on an arena replaced by (arena, byte
  offset, dtype, shape, strides), and hands over each arena's file descriptor once, the first time a
  request uses it. An arena's pages cost memory only once written, so arenas are large and few.
- The storage writer and the save planner travel pickled with the request (they hold declarations,
  a topology, storage options; not the training objects).
- The upload processes of all ranks form a gloo process group of their own (rank 0's upload process
  hosts its TCPStore on a free port, which the training ranks pass on through the coordinator's
  group), so background collectives never touch the training's groups.

Why not DCP's ``AsyncCheckpointerType.PROCESS``: it keeps one daemon per interpreter for every
saver, needs an initialised default process group (no single-process jobs), re-sends every staged
storage's file descriptor through ``multiprocessing``'s resource sharer at every save (a socket
connection each), has no way to close it, and starts it with ``multiprocessing``'s ``spawn``, which
imports the script's main module again (a script without the ``if __name__ == "__main__":`` guard
runs twice) and is refused in a daemonic process. The upload process here is a plain interpreter
(``subprocess``) running ``serve``, over a socket pair it inherits; it learns the training
process's ``sys.path`` first, so that whatever the training process can import (a custom fsspec
filesystem the writer holds, say) it can too.

Lifecycle: the training process starts its upload process when its coordinator is built, and the
first save joins the upload processes into their group (collective on every rank). The upload process
serves one request at a time and exits when told to (``close``) or at once when the training process
is gone. It ignores SIGINT and SIGTERM, which often reach a whole process group (Ctrl-C, torchrun
stopping its workers): the training process decides, and its teardown (``teardown.py``) waits for the
save in flight before it exits, as with thread uploads. When the training process is gone, killed or
exited, the upload process ends within ``PARENT_CHECK_S``: an upload outliving its job could still be
writing when a restarted job discards uncommitted checkpoints, and then commit a directory with files
missing. So a killed job's save in flight is never committed, as with thread uploads.
"""

from __future__ import annotations

import contextlib
import datetime
import io
import logging
import mmap
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.reduction import recvfds, sendfds
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.constants import default_pg_timeout

from ._torch_compat import default_group_timeout, single_process_dcp
from .errors import first_rank_failure
from .format.manifest import CheckpointManifest
from .gc_pause import paused_gc
from .planners import ForgeSavePlanner, PlanCache
from .rank_exchange import RankExchange
from .storage import ForgeStorageWriter

logger = logging.getLogger(__name__)

# Arenas are reserved at least this large: their pages are allocated only when written.
ARENA_MIN_BYTES = 1 << 30
# Buffers start on this alignment inside an arena (any dtype's elements fall on whole offsets).
ALIGNMENT = 64
# Descriptors passed in one message at most (the kernel's limit per message is 253).
FDS_PER_MESSAGE = 200
# How long a rank waits for its upload process to join the upload processes' group.
START_TIMEOUT_S = 600.0
# How often the upload process checks that the training process is still there.
PARENT_CHECK_S = 0.05
# The persistent-id tag of a tensor on an arena in a request.
_ON_ARENA = "dcp-forge-arena"


def save_failure(error: BaseException, writer: ForgeStorageWriter, group: Any) -> BaseException:
    """A failed background save's error as the caller sees it: DCP's CheckpointException (raised on
    every rank once every rank's step returned) becomes the failing rank's own typed error, after the
    writer removed what the save wrote (``discard_failed_save``, collective over ``group``)."""
    if not isinstance(error, CheckpointException):
        return error
    original = first_rank_failure(error) or error
    writer.discard_failed_save(original, group)
    return original


# --- shared staging memory ----------------------------------------------------------------------
@dataclass
class _Arena:
    arena_id: int
    size: int
    base: int  # the mapping's address in this process
    fd: int | None  # until handed to the upload process
    mapping: mmap.mmap | None  # held while buffers are still cut from it
    used: int = 0


class SharedArenas:
    """Staging buffers in shared memory that an upload process maps too (``allocate`` is a stager's
    allocator). Thread-safe: buffers die on whatever thread drops them."""

    def __init__(self) -> None:
        if not hasattr(os, "memfd_create"):
            raise NotImplementedError("AsyncOptions(upload='process') needs Linux (os.memfd_create) to share "
                                      "staging memory with the upload process; use upload='thread' here")
        # Re-entrant: dropping the last reference to an arena's mapping (here too) runs _forget at once.
        self._lock = threading.RLock()
        self._arenas: dict[int, _Arena] = {}
        self._current: _Arena | None = None
        self._next_id = 0
        self._dead: list[int] = []

    def allocate(self, nbytes: int) -> torch.UntypedStorage:
        if nbytes == 0:
            return torch.UntypedStorage(0)
        with self._lock:
            arena = self._current
            if arena is None or arena.size - arena.used < nbytes:
                arena = self._current = self._new_arena(max(nbytes, ARENA_MIN_BYTES))
            offset = arena.used
            arena.used = -(-(offset + nbytes) // ALIGNMENT) * ALIGNMENT
            # The buffer holds the mapping alive; the arena is gone once every buffer cut from it is.
            return torch.frombuffer(arena.mapping, dtype=torch.uint8, count=nbytes, offset=offset).untyped_storage()

    def _new_arena(self, size: int) -> _Arena:
        arena_id = self._next_id
        self._next_id += 1
        fd = os.memfd_create(f"dcp-forge-staging-{arena_id}", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, size)
            mapping = mmap.mmap(fd, size)
        except BaseException:
            os.close(fd)
            raise
        base = torch.frombuffer(mapping, dtype=torch.uint8, count=1).data_ptr()
        arena = _Arena(arena_id, size, base, fd, mapping)
        weakref.finalize(mapping, self._forget, arena_id)
        if self._current is not None:
            self._current.mapping = None  # no more buffers from it: it lives as long as its buffers do
        self._arenas[arena_id] = arena
        return arena

    def _forget(self, arena_id: int) -> None:
        with self._lock:
            arena = self._arenas.pop(arena_id, None)
            if arena is not None and arena.fd is not None:
                os.close(arena.fd)
            elif arena is not None:
                self._dead.append(arena_id)

    def locate(self, address: int) -> tuple[int, int] | None:
        """(arena id, byte offset) of an address inside a live arena."""
        with self._lock:
            for arena in self._arenas.values():
                if arena.base <= address < arena.base + arena.size:
                    return arena.arena_id, address - arena.base
        return None

    def take_unsent(self) -> list[tuple[int, int, int]]:
        """(arena id, size, fd) of the arenas the upload process has not been handed yet; the caller
        sends and closes the descriptors."""
        with self._lock:
            unsent = [(a.arena_id, a.size, a.fd) for a in self._arenas.values() if a.fd is not None]
            for arena in self._arenas.values():
                arena.fd = None
        return unsent

    def take_dead(self) -> list[int]:
        """Arenas the upload process may unmap (every buffer of them is gone here)."""
        with self._lock:
            dead, self._dead = self._dead, []
        return dead

    def close(self) -> None:
        with self._lock:
            if self._current is not None:
                self._current.mapping = None
            self._current = None
            for arena in self._arenas.values():
                if arena.fd is not None:
                    os.close(arena.fd)
                    arena.fd = None


class _RequestPickler(pickle.Pickler):
    """Pickles a request, sending every plain CPU tensor that lives on an arena by reference."""

    def __init__(self, file: io.BytesIO, arenas: SharedArenas) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self._arenas = arenas

    def persistent_id(self, obj: Any) -> Any:
        if type(obj) is not torch.Tensor or obj.device.type != "cpu" or obj.layout is not torch.strided:
            return None
        if obj.is_quantized or obj.is_conj() or obj.is_neg() or obj.__dict__:
            return None  # pickled by value, with everything that makes it what it is
        storage = obj.untyped_storage()
        if storage.nbytes() == 0:
            return None
        where = self._arenas.locate(storage.data_ptr())
        if where is None:
            return None
        arena_id, offset = where
        return (_ON_ARENA, arena_id, offset, obj.dtype, tuple(obj.shape), obj.stride(), obj.storage_offset())


class _RequestUnpickler(pickle.Unpickler):
    def __init__(self, file: io.BytesIO, arenas: dict[int, torch.Tensor]) -> None:
        super().__init__(file)
        self._arenas = arenas

    def persistent_load(self, pid: Any) -> Any:
        tag, arena_id, offset, dtype, shape, stride, storage_offset = pid
        if tag != _ON_ARENA:
            raise pickle.UnpicklingError(f"unknown persistent id {tag!r} in an upload request")
        itemsize = torch.empty(0, dtype=dtype).element_size()
        arena = self._arenas[arena_id]
        return torch.empty(0, dtype=dtype).set_(arena.untyped_storage(), offset // itemsize + storage_offset,
                                                shape, stride)


def _portable(error: BaseException) -> BaseException:
    """``error`` if it survives pickling, else a RuntimeError saying what it was."""
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:
        portable = RuntimeError(f"{type(error).__name__}: {error}")
        for note in getattr(error, "__notes__", ()):
            portable.add_note(note)
        return portable


# --- the training process's side ----------------------------------------------------------------
class UploadProcess:
    """This rank's upload process. Construction starts it (local: importing torch there takes a while,
    so it happens while the job sets up); ``connect`` is collective (every rank's upload process joins
    one process group, with the help of ``group``, the coordinator's) and must precede ``submit``;
    ``submit`` and ``close`` are local."""

    def __init__(self, rank: int, world_size: int) -> None:
        self.rank = rank
        self.world_size = world_size
        self.connected = False
        self.arenas = SharedArenas()
        if not sys.executable:
            raise RuntimeError("AsyncOptions(upload='process') needs sys.executable to start the upload process")
        # The upload group waits in its collectives as long as the job's own group does.
        timeout = default_group_timeout() or default_pg_timeout
        parent_end, child_end = socket.socketpair()
        try:
            self._process = subprocess.Popen(
                [sys.executable, "-c", _BOOTSTRAP, str(child_end.fileno()), str(rank), str(world_size), str(os.getpid()),
                 str(timeout.total_seconds())],
                pass_fds=(child_end.fileno(),))
        except BaseException:
            parent_end.close()
            raise
        finally:
            child_end.close()
        self._conn = Connection(parent_end.detach())
        self._conn.send(list(sys.path))
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"forge-upload-{rank}")

    def connect(self, group: Any, master_host: str) -> None:
        """Collective: wait until every rank's upload process is up and in the upload group; raises on
        every rank if one is not. ``master_host``: where rank 0's upload process is reached (rank 0's say)."""
        from .async_staging import agree

        error: BaseException | None = None
        try:
            self._join_group(group, master_host)
        except BaseException as err:  # agreed on below: every rank raises
            error = err
        agree(error, group, self.rank, "the upload processes did not start")
        self.connected = True

    def _join_group(self, group: Any, master_host: str) -> None:
        if self.world_size > 1:
            box: list[Any] = [None]
            if self.rank == 0:
                box[0] = (master_host, self._expect("store"))
            dist.broadcast_object_list(box, src=0, group=group)
            if self.rank != 0:
                self._conn.send(("store", *box[0]))
        self._expect("ready", timeout=START_TIMEOUT_S)
        logger.info("rank %d: upload process %d is ready", self.rank, self._process.pid)

    def _expect(self, kind: str, timeout: float | None = START_TIMEOUT_S) -> Any:
        if timeout is not None and not self._conn.poll(timeout):
            raise TimeoutError(f"rank {self.rank}: the upload process said nothing for {timeout:.0f} s "
                               f"(waiting for {kind!r})")
        status, value = self._receive()
        if status == "error":
            raise value
        if status != kind:
            raise RuntimeError(f"rank {self.rank}: the upload process answered {status!r}, expected {kind!r}")
        return value

    def _receive(self) -> tuple[str, Any]:
        try:
            return self._conn.recv()
        except (EOFError, OSError) as err:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._process.wait(5)
            raise RuntimeError(f"rank {self.rank}: the upload process (pid {self._process.pid}) is gone (exit code "
                               f"{self._process.returncode}); the save in flight, if any, was not committed") from err

    def submit(self, staged: dict[str, Any] | Future[dict[str, Any]], writer: ForgeStorageWriter,
               planner: ForgeSavePlanner) -> Future[CheckpointManifest | None]:
        """Save ``staged`` (or the state dict a staging future gives) in the upload process; the future
        gives the committed manifest (None on ranks other than the coordinator) or raises the save's
        typed error."""
        return self._executor.submit(self._upload, staged, writer, planner)

    def _upload(self, staged: dict[str, Any] | Future[dict[str, Any]], writer: ForgeStorageWriter,
                planner: ForgeSavePlanner) -> CheckpointManifest | None:
        if isinstance(staged, Future):
            staged = staged.result()
        buffer = io.BytesIO()
        _RequestPickler(buffer, self.arenas).dump((writer, planner, staged))
        del staged
        unsent, dead = self.arenas.take_unsent(), self.arenas.take_dead()
        sent = False
        try:
            self._conn.send(("save", dead, [(arena_id, size) for arena_id, size, _ in unsent]))
            with socket.socket(fileno=os.dup(self._conn.fileno())) as sock:
                for start in range(0, len(unsent), FDS_PER_MESSAGE):
                    sendfds(sock, [fd for _, _, fd in unsent[start:start + FDS_PER_MESSAGE]])
            self._conn.send_bytes(buffer.getbuffer())
            sent = True
        except OSError:
            pass  # the process is gone: its last words, or its absence, are read below and raised
        finally:
            for _, _, fd in unsent:
                os.close(fd)
        # A save takes as long as it takes; a process that could not take the request answers at once.
        outcome, planner.planned_by = self._expect("saved", timeout=None if sent else START_TIMEOUT_S)
        writer.adopt_outcome(outcome)
        return writer.manifest

    @property
    def pid(self) -> int | None:
        return self._process.pid

    def alive(self) -> bool:
        return self._process.poll() is None

    def close(self, timeout: float = 60.0) -> None:
        """Stop the upload process (after the request it serves, if any) and free the shared memory
        it has not been handed. Local; idempotent."""
        if self.alive():
            with contextlib.suppress(OSError):
                self._conn.send(("stop",))
            try:
                self._process.wait(timeout)
            except subprocess.TimeoutExpired:
                logger.warning("rank %d: the upload process did not stop within %.0f s; killing it",
                               self.rank, timeout)
                self._process.kill()
                self._process.wait()
        self._conn.close()
        self._executor.shutdown(wait=False)
        self.arenas.close()


# --- the upload process's side ------------------------------------------------------------------
# What the upload process runs: signals the training process decides about ignored from the start, the
# socket it inherited, then the training process's sys.path (before importing anything of ours), serve().
_BOOTSTRAP = """
import signal, sys
signal.signal(signal.SIGINT, signal.SIG_IGN)
signal.signal(signal.SIGTERM, signal.SIG_IGN)
from multiprocessing.connection import Connection
conn = Connection(int(sys.argv[1]))
sys.path[:] = conn.recv()
from dcp_forge.async_process import serve
serve(conn, int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5]))
"""


def serve(conn: Any, rank: int, world_size: int, parent_pid: int, timeout_s: float) -> None:
    """The upload process: join the upload group (its collectives waiting up to ``timeout_s``), then save
    what the training process sends."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    threading.Thread(target=_exit_with_parent, args=(parent_pid,), name="forge-upload-watchdog", daemon=True).start()
    torch.set_num_threads(1)  # serialization and hashing run on the writer's threads, not torch's
    try:
        _join_upload_group(conn, rank, world_size, datetime.timedelta(seconds=timeout_s))
    except BaseException as err:  # reported to the training process, which raises it
        conn.send(("error", _portable(err)))
        return
    conn.send(("ready", None))
    try:
        _serve_requests(conn, world_size)
    finally:
        if dist.is_initialized():
            with contextlib.suppress(Exception):
                dist.destroy_process_group()
        conn.close()


def _exit_with_parent(parent_pid: int) -> None:
    """End this process at once when the training process is gone (re-parented: another parent id)."""
    while os.getppid() == parent_pid:
        time.sleep(PARENT_CHECK_S)
    os._exit(1)


def _join_upload_group(conn: Any, rank: int, world_size: int, timeout: datetime.timedelta) -> None:
    if world_size == 1:
        return
    if rank == 0:  # hosts the store, on a port the system picks (no race for a "free" port)
        store = dist.TCPStore("0.0.0.0", 0, world_size, is_master=True, timeout=timeout, wait_for_workers=False)
        conn.send(("store", store.port))
    else:
        message = conn.recv()
        if message[0] != "store":  # told to stop before the group was complete
            raise RuntimeError(f"upload process of rank {rank}: expected the store's address, got {message[0]!r}")
        _, host, port = message
        store = dist.TCPStore(host, port, world_size, is_master=False, timeout=timeout)
    dist.init_process_group("gloo", store=dist.PrefixStore("dcp-forge-upload", store), rank=rank,
                            world_size=world_size, timeout=timeout)


def _serve_requests(conn: Any, world_size: int) -> None:
    arenas: dict[int, torch.Tensor] = {}
    # This process serves one coordinator for its whole life, over one group: its saves reuse their
    # plans as the coordinator's own saves do (a request's planner arrives without a cache).
    plans = PlanCache()
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return  # the training process is gone
        if message[0] == "stop":
            return
        _, dead, new = message
        for arena_id in dead:
            arenas.pop(arena_id, None)
        fds: list[int] = []
        with socket.socket(fileno=os.dup(conn.fileno())) as sock:
            for start in range(0, len(new), FDS_PER_MESSAGE):
                fds += recvfds(sock, len(new[start:start + FDS_PER_MESSAGE]))
        for (arena_id, size), fd in zip(new, fds, strict=True):
            try:
                arenas[arena_id] = torch.frombuffer(mmap.mmap(fd, size), dtype=torch.uint8)
            finally:
                os.close(fd)
        payload = conn.recv_bytes()
        try:
            writer, planner, staged = _RequestUnpickler(io.BytesIO(payload), arenas).load()
            planner.plan_cache = plans
            reply: tuple[str, Any] = ("saved", (_save(staged, writer, planner, world_size), planner.planned_by))
        except BaseException as err:  # the training process raises it on the handle
            reply = ("error", _portable(err))
        del payload
        try:
            conn.send(reply)
        except OSError:
            return  # the training process is gone; the save ended as it did


def _save(staged: dict[str, Any], writer: ForgeStorageWriter, planner: ForgeSavePlanner, world_size: int) -> Any:
    """Save ``staged`` in the upload process; the writer's ``outcome()``, for the training process's copy
    (with ``planner.planned_by``, for its planner's)."""
    no_dist = world_size == 1
    group = None if no_dist else dist.group.WORLD
    # Every rank plans by itself here too, over the upload processes' group.
    writer.exchange = planner.exchange = RankExchange(group)
    # Nothing but this save runs here: the collector may rest for it, as for a sync save (gc_pause.py).
    with single_process_dcp(no_dist), paused_gc():
        try:
            dcp.save(staged, storage_writer=writer, planner=planner, no_dist=no_dist, use_collectives=False)
        except BaseException as err:
            raise save_failure(err, writer, group) from None
    return writer.outcome()


def master_host(single_node: bool) -> str:
    """Where the other ranks' upload processes reach rank 0's: MASTER_ADDR when torchrun set it, the
    loopback address on one node, else this host's name."""
    return os.environ.get("MASTER_ADDR") or ("127.0.0.1" if single_node else socket.getfqdn())
