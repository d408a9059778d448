"""Recording the reads a load makes from local files: which file, at which offset, into views of which sizes."""

from __future__ import annotations

import os

import pytest


def record_local_reads(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int, list[int]]]:
    """(file name, offset, view sizes) of every read the local backend makes from now on (a
    ``read_into`` is one view), appended to the returned list."""
    from dcp_forge.storage import backends

    calls: list[tuple[str, int, list[int]]] = []
    real = backends._LocalInput.read_scatter

    def read_scatter(self, offset, views):
        calls.append((os.path.basename(self.path), offset, [memoryview(v).nbytes for v in views]))
        real(self, offset, views)

    monkeypatch.setattr(backends._LocalInput, "read_scatter", read_scatter)
    return calls
