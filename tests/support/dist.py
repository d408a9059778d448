"""Run a function on N real processes joined in a gloo process group (CPU, 127.0.0.1).

Rendezvous goes through a FileStore in a temp dir, so tests never race for TCP ports. Simulated
nodes: ``ranks_per_node`` sets LOCAL_RANK / LOCAL_WORLD_SIZE the way torchrun would. Each rank runs
torch with one intra-op thread: on a 2-core machine shared by several ranks, more threads per process
only add contention. Collectives time out after ``timeout`` seconds too (``collective_timeout``, where
given), so a rank whose peer died fails instead of waiting forever.

Ranks start from a fork server that has imported torch and dcp_forge once (``spawn`` would import
torch afresh in every rank: seconds each on a loaded 2-core machine, against ~50 ms for a fork).
Each rank gets the parent's current environment, as ``spawn`` would give it. Results travel as
``torch.save`` bytes: a tensor put on a torch.multiprocessing queue as is would be shared through its
sender's file descriptors, which are gone once the rank exits.
"""

from __future__ import annotations

import datetime
import io
import os
import tempfile
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.multiprocessing as mp

from tests.support import tiers

# What the fork server imports before forking ranks: the heavy, side-effect-free imports every rank needs.
_PRELOAD = ["torch", "torch.distributed", "torch.distributed.checkpoint", "dcp_forge"]


def rank_context():
    """The multiprocessing context ranks are started from (a fork server with torch preloaded)."""
    tiers.require("dist", "starts rank processes")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)  # only read when the server starts, once per test session
    return ctx


def _worker(rank: int, world_size: int, init_file: str, ranks_per_node: int, timeout: float, fn: Callable,
            args: tuple, results: Any, environ: dict[str, str]) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)

    os.environ.clear()  # the fork server's environment is from when it started: use the caller's
    os.environ.update(environ)
    os.environ.update({
        "RANK": str(rank), "WORLD_SIZE": str(world_size),
        "LOCAL_RANK": str(rank % ranks_per_node), "LOCAL_WORLD_SIZE": str(ranks_per_node),
        "GROUP_RANK": str(rank // ranks_per_node),
    })
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=timeout))
        try:
            value = fn(rank, world_size, *args)
            buffer = io.BytesIO()
            torch.save(value, buffer)
            results.put((rank, "ok", buffer.getvalue()))
        finally:
            dist.destroy_process_group()
    except BaseException:  # report every failure to the parent, with its traceback
        results.put((rank, "err", traceback.format_exc()))


def run_ranks(fn: Callable, world_size: int, *args: Any, ranks_per_node: int | None = None,
              timeout: float = 180.0, collective_timeout: float | None = None) -> list[Any]:
    """``fn(rank, world_size, *args)`` on every rank; returns the results in rank order.

    Raises AssertionError with every failing rank's traceback if any rank fails or times out.
    """
    ctx = rank_context()
    results = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "rendezvous")
        procs = [ctx.Process(target=_worker, daemon=True,
                             args=(r, world_size, init_file, ranks_per_node or world_size,
                                   collective_timeout or timeout, fn, args, results,
                                   dict(os.environ)))
                 for r in range(world_size)]
        for p in procs:
            p.start()
        collected: dict[int, tuple[str, Any]] = {}
        waiting_failed = ""
        try:
            for _ in range(world_size):
                rank, status, value = results.get(timeout=timeout)
                collected[rank] = (status, value)
        except Exception as err:  # timeout (queue.Empty) or a result that could not be received
            waiting_failed = f" (waiting for results: {type(err).__name__}: {err})"
        finally:
            for p in procs:
                p.join(timeout=10)
                if p.is_alive():
                    p.kill()
    failures = {r: v for r, (s, v) in collected.items() if s == "err"}
    missing = sorted(set(range(world_size)) - set(collected))
    if failures or missing:
        text = "\n".join(f"--- rank {r} ---\n{tb}" for r, tb in sorted(failures.items()))
        raise AssertionError(f"ranks failed: {sorted(failures)}; no result from ranks {missing}{waiting_failed}\n{text}")
    return [torch.load(io.BytesIO(collected[r][1]), weights_only=False) for r in range(world_size)]
