"""Kill a real process (SIGKILL) at a random moment of an async save; the previous checkpoint must
stay the latest and load bit-exactly (or, if the kill came after the commit, the new one must).

Each trial forks a child process (from a server that imported torch once) that saves
``checkpoint-1`` synchronously (timing it), changes its state, starts ``async_save(checkpoint-2)``,
says so, and keeps training (changing the state in place), also after the commit. The parent kills it at a uniformly random moment in [0, 2 x the sync save's
duration] after the async save returned, then checks, as a process that did not write them: which checkpoint
``latest_checkpoint`` names, that every committed one loads bit-exactly to the values of its call,
that an uncommitted ``checkpoint-2`` is invisible (and removable with
``discard_partial_checkpoints``), and that listing never raises.

Usage: ``python -m tools.crash_async [--trials 200] [--mib 256] [--dir .bench/crash] [--staging overlapped]
[--upload process]``. With ``--upload process`` each trial also checks that the upload process ends
with its killed training process.
A short version (3 trials) runs in CI: tests/coordinator/test_async_crash.py.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import time
import warnings
from collections import Counter
from typing import Any

import torch

from dcp_forge import (
    AsyncOptions,
    CheckpointCoordinator,
    StateComponent,
    discard_partial_checkpoints,
    latest_checkpoint,
    list_checkpoints,
)
from dcp_forge.storage import CheckpointState, checkpoint_state, open_backend
from tests.support.dist import rank_context

BLOCKING = AsyncOptions()  # staging at the call, uploading on a thread


class Weights:
    """``count`` float32 tensors of ``mib`` MiB together, a deterministic function of ``version``."""

    def __init__(self, mib: int, version: int, count: int = 8) -> None:
        numel = (mib << 20) // 4 // count
        # Small integers: float32 holds them exactly, so advancing in place equals building at a version.
        ramp = (torch.arange(numel) % 4096).to(torch.float32)
        self.tensors = {f"w{i}": ramp + (version + 10 * i) for i in range(count)}
        self.step = version

    def state_dict(self):
        return {"tensors": self.tensors, "step": self.step}

    def load_state_dict(self, state):
        self.tensors, self.step = state["tensors"], state["step"]

    def advance(self) -> None:
        for t in self.tensors.values():
            t.add_(1.0)
        self.step += 1


def child(directory: str, mib: int, report: Any, options: AsyncOptions) -> None:
    """Save checkpoint-1 (version 1) sync, then checkpoint-2 (version 2) async while training on.
    Overlapped staging: every change of the state is a declared mutation point (``mutating``)."""
    warnings.simplefilter("ignore")
    weights = Weights(mib, version=1)
    coord = CheckpointCoordinator([StateComponent("model", weights, "replicated")], output_dir=directory,
                                  async_options=options)
    start = time.perf_counter()
    coord.save_checkpoint(checkpoint_id="checkpoint-1")
    report.send(("SYNC", time.perf_counter() - start))
    weights.advance()  # version 2
    handle = coord.async_save(checkpoint_id="checkpoint-2")
    upload = coord._async_saves.upload_process
    report.send(("STAGED", None if upload is None else upload.pid))
    while not handle.done():
        with coord.mutating():
            weights.advance()  # training goes on, changing the state in place
        time.sleep(0.01)
    handle.result()
    report.send(("COMMITTED", None))
    while True:  # keep living: the parent's kill must always hit a running process
        with coord.mutating():
            weights.advance()
        time.sleep(0.01)


def _expect(conn: Any, what: str, proc: Any) -> Any:
    if not conn.poll(300):
        raise AssertionError(f"the child sent no {what} within 300 s (exit code {proc.exitcode})")
    tag, value = conn.recv()
    if tag != what:
        raise AssertionError(f"the child sent {tag}, expected {what}")
    return value


def _loads_exactly(path: str, directory: str, mib: int, version: int) -> bool:
    expected = Weights(mib, version)
    target = Weights(mib, version=-100)
    CheckpointCoordinator([StateComponent("model", target, "replicated")], output_dir=directory
                          ).load_checkpoint(path)
    return target.step == version and all(torch.equal(target.tensors[k], expected.tensors[k])
                                          for k in expected.tensors)


def process_gone(pid: int, patience_s: float = 60.0) -> bool:
    """Whether process ``pid`` is gone, waiting up to ``patience_s`` (not a timing check: a bound on a hang)."""
    deadline = time.monotonic() + patience_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def trial(directory: str, mib: int, rng: random.Random, options: AsyncOptions = BLOCKING) -> dict:
    """One kill; returns what was observed (raises AssertionError if a guarantee broke)."""
    shutil.rmtree(directory, ignore_errors=True)
    os.makedirs(directory)
    # Children fork from a server that imported torch and dcp_forge once (a fresh interpreter per
    # trial would spend seconds importing); SIGKILL ends them like any process.
    ctx = rank_context()
    receive, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=child, args=(directory, mib, send, options), daemon=True)
    proc.start()
    send.close()
    try:
        sync_seconds = _expect(receive, "SYNC", proc)
        upload_pid = _expect(receive, "STAGED", proc)
        delay = rng.uniform(0.0, 2.0 * sync_seconds)
        time.sleep(delay)
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(60)
    finally:
        if proc.is_alive():
            proc.kill()
            proc.join()
        receive.close()
    # An upload process outliving its killed job could commit later, under a restarted job's feet.
    if upload_pid is not None and not process_gone(upload_pid):
        os.kill(upload_pid, signal.SIGKILL)
        raise AssertionError(f"the upload process {upload_pid} outlived its killed training process")
    first, second = os.path.join(directory, "checkpoint-1"), os.path.join(directory, "checkpoint-2")
    backend, native = open_backend(second)
    state = checkpoint_state(backend, native)
    committed = list_checkpoints(directory)
    latest = latest_checkpoint(directory)
    if not _loads_exactly(first, directory, mib, version=1):
        raise AssertionError("checkpoint-1 does not load bit-exactly after the kill")
    if state is CheckpointState.COMMITTED:
        if latest != second or committed != [first, second]:
            raise AssertionError(f"checkpoint-2 is committed but latest={latest}, listed={committed}")
        if not _loads_exactly(second, directory, mib, version=2):
            raise AssertionError("checkpoint-2 is committed but does not hold the values of its call")
    else:
        if latest != first or committed != [first]:
            raise AssertionError(f"uncommitted checkpoint-2 ({state}) is visible: latest={latest}, listed={committed}")
        removed = discard_partial_checkpoints(directory)
        if removed != ([second] if state is CheckpointState.PARTIAL else []):
            raise AssertionError(f"discard_partial_checkpoints removed {removed} (checkpoint-2 was {state})")
    return {"delay_s": round(delay, 4), "checkpoint_2": state.value, "latest": os.path.basename(latest)}


def run_trials(trials: int, mib: int, directory: str, seed: int | None = None,
               options: AsyncOptions = BLOCKING) -> list[dict]:
    rng = random.Random(seed)
    return [trial(directory, mib, rng, options) for _ in range(trials)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=200)
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--dir", default=".bench/crash")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--staging", choices=("blocking", "overlapped"), default="blocking")
    parser.add_argument("--upload", choices=("thread", "process"), default="thread")
    args = parser.parse_args()
    options = AsyncOptions(staging=args.staging, upload=args.upload)
    warnings.simplefilter("ignore")
    results = []
    for i in range(args.trials):
        results.append(trial(args.dir, args.mib, random.Random(None if args.seed is None else args.seed + i), options))
        print(json.dumps(results[-1]), flush=True)
    shutil.rmtree(args.dir, ignore_errors=True)
    outcomes = Counter(r["checkpoint_2"] for r in results)
    print(f"{len(results)} kills, all guarantees held; checkpoint-2 afterwards: {dict(outcomes)}")


if __name__ == "__main__":
    main()
