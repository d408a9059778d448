"""Run a function on N spawned processes joined in a gloo group on 127.0.0.1.

Workers assert inside; a failure re-raises in the test with the worker's traceback
(``torch.multiprocessing.ProcessRaisedException``). A run that outlives ``timeout`` has its processes
killed and raises ``TimeoutError``, so a deadlocked collective fails the test instead of hanging it.
"""

from __future__ import annotations

import datetime
import os
import socket
import time
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, fn: Callable, world_size: int, port: int, args: tuple) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    # Two cores shared by several processes: more threads per process only adds contention.
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=60))
    try:
        fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()


def run_spawned(fn: Callable, world_size: int, *args, timeout: float = 120.0) -> None:
    """Call ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; ``fn`` must be importable."""
    ctx = mp.start_processes(
        _entry, args=(fn, world_size, free_port(), args), nprocs=world_size, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
        if time.monotonic() >= deadline:
            for process in ctx.processes:
                if process.is_alive():
                    process.kill()
            for process in ctx.processes:
                process.join(5)
            raise TimeoutError(f"spawned {getattr(fn, '__name__', fn)} did not finish within {timeout} s")
