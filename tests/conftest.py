"""Fixtures shared by the test modules."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one thread; more only adds synchronisation, which a busy machine
    turns into long stalls (a TinyLM step: ~5 ms on one thread, 150-600 ms on two of a loaded 2-core VM)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
