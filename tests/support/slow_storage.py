"""A local filesystem whose writes are slow: ``slowfile:///path`` with storage option ``seconds_per_mib``.

For tests that must race something against an upload in progress (a teardown, a signal): the bytes
really go to local disk, just at a bounded rate, like a slow network store. The checkpoint it writes
is an ordinary local directory afterwards (``/path``), read back with the plain path.

Register it in every process that writes (``register()``; rank processes included: fsspec's registry
is per process).
"""

from __future__ import annotations

import time
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileOpener, LocalFileSystem

PROTOCOL = "slowfile"


class _SlowFile(LocalFileOpener):
    def __init__(self, path: str, mode: str, seconds_per_mib: float, **kwargs: Any) -> None:
        super().__init__(path, mode, **kwargs)
        self._seconds_per_byte = seconds_per_mib / (1 << 20)

    def write(self, data: Any) -> int:
        time.sleep(memoryview(data).nbytes * self._seconds_per_byte)
        return super().write(data)


class SlowLocalFileSystem(LocalFileSystem):
    """``LocalFileSystem`` writing at ``1 / seconds_per_mib`` MiB/s per open file."""

    protocol = PROTOCOL

    def __init__(self, seconds_per_mib: float = 0.0, **kwargs: Any) -> None:
        super().__init__(auto_mkdir=True, **kwargs)
        self.seconds_per_mib = float(seconds_per_mib)

    def _open(self, path: str, mode: str = "rb", block_size: Any = None, **kwargs: Any) -> Any:
        if not any(flag in mode for flag in "wxa"):
            return super()._open(path, mode, block_size, **kwargs)
        path = self._strip_protocol(path)
        self.makedirs(self._parent(path), exist_ok=True)
        return _SlowFile(path, mode, self.seconds_per_mib, fs=self, **kwargs)


def register() -> None:
    fsspec.register_implementation(PROTOCOL, SlowLocalFileSystem, clobber=True)


def slow_url(path: str) -> str:
    return f"{PROTOCOL}://{path}"
