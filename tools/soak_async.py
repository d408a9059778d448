"""Soak: many consecutive async saves (old checkpoints deleted as new ones commit); resources must
not grow.

Reports, per rank, RSS, threads, open file descriptors and child processes: before the coordinator
exists, after the first save (staging buffers and the background process group now exist), after the
last save, and after ``close()``. Targets (issue 4, P5): RSS after the last save within 5% of after
the first; threads, fds and children after the last save no more than after the first; after close()
no more threads, fds and children than at the start.

Usage: ``python tools/soak_async.py [--saves 100] [--mib 256] [--world 1] [--dir .bench/soak]``.
A short version (10 saves of a small state) runs in CI: tests/test_async_soak.py.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import sys
import tempfile
import threading
import time
import warnings

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from dcp_forge import CheckpointCoordinator, StateComponent, delete_checkpoint, list_checkpoints  # noqa: E402

KEEP = 2  # committed checkpoints kept; older ones are deleted as each save commits
RSS_GROWTH_LIMIT = 0.05


class Weights:
    def __init__(self, mib: int, count: int = 8) -> None:
        numel = max(1, (mib << 20) // 4 // count)
        self.tensors = {f"w{i}": torch.full((numel,), float(i)) for i in range(count)}
        self.step = 0

    def state_dict(self):
        return {"tensors": self.tensors, "step": self.step}

    def load_state_dict(self, state):
        self.tensors, self.step = state["tensors"], state["step"]

    def train_step(self) -> None:
        for t in self.tensors.values():
            t.mul_(0.999).add_(0.001)
        self.step += 1


def _children() -> int:
    me = str(os.getpid())
    count = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        count += fields[1] == me  # field 4 of stat: the parent pid
    return count


def _quiet_threads(timeout: float = 5.0) -> None:
    """Let DCP's per-save executor thread (shut down without waiting) finish exiting."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(t.name.startswith("AsyncCheckpointExecutor")
                                              for t in threading.enumerate()):
        time.sleep(0.01)


def resources() -> dict[str, int]:
    gc.collect()
    _quiet_threads()
    with open("/proc/self/statm") as f:
        rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return {"rss": rss, "threads": len(os.listdir("/proc/self/task")), "fds": len(os.listdir("/proc/self/fd")),
            "children": _children()}


def _delete_old(directory: str) -> None:
    for path in list_checkpoints(directory)[:-KEEP]:
        delete_checkpoint(path)


def soak(rank: int, world: int, directory: str, saves: int, mib: int) -> dict:
    """``saves`` async saves of ``mib`` MiB on this rank; returns the resource snapshots."""
    warnings.simplefilter("ignore")
    weights = Weights(mib)
    snapshots = {"start": resources()}
    coord = CheckpointCoordinator([StateComponent("model", weights, "per_rank")], output_dir=directory)
    blocked = []
    for i in range(saves):
        weights.train_step()
        handle = coord.async_save(checkpoint_id=f"checkpoint-{i}")
        blocked.append(handle.staging_seconds)
        if rank == 0:  # retention as a trainer would do it: once a save commits, drop the old ones
            handle.add_done_callback(lambda h: h.exception() is None and _delete_old(directory))
        weights.train_step()
        if i == 0:
            handle.result()
            snapshots["after_first"] = resources()
    coord.wait()
    snapshots["after_last"] = resources()
    coord.close()
    del coord
    snapshots["after_close"] = resources()
    committed = list_checkpoints(directory)
    return {"snapshots": snapshots, "committed": [os.path.basename(p) for p in committed],
            "blocked_first_s": blocked[0], "blocked_median_s": sorted(blocked)[len(blocked) // 2]}


def verdict(report: dict) -> list[str]:
    """Violated targets (empty when all hold)."""
    s = report["snapshots"]
    problems = []
    growth = s["after_last"]["rss"] / s["after_first"]["rss"] - 1.0
    if growth > RSS_GROWTH_LIMIT:
        problems.append(f"RSS grew {growth:.1%} from the first to the last save (limit {RSS_GROWTH_LIMIT:.0%})")
    for key in ("threads", "fds", "children"):
        if s["after_last"][key] > s["after_first"][key]:
            problems.append(f"{key}: {s['after_first'][key]} after the first save, {s['after_last'][key]} after the last")
        if s["after_close"][key] > s["start"][key]:
            problems.append(f"{key}: {s['start'][key]} at start, {s['after_close'][key]} after close()")
    return problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--saves", type=int, default=100)
    parser.add_argument("--mib", type=int, default=256, help="state size per rank")
    parser.add_argument("--world", type=int, default=1)
    parser.add_argument("--dir", default=None)
    args = parser.parse_args()
    directory = args.dir or tempfile.mkdtemp(prefix="soak_async_")
    shutil.rmtree(directory, ignore_errors=True)
    os.makedirs(directory)
    start = time.perf_counter()
    if args.world == 1:
        reports = [soak(0, 1, directory, args.saves, args.mib)]
    else:
        from tests.dist import run_ranks

        reports = run_ranks(soak, args.world, directory, args.saves, args.mib, timeout=3600)
    elapsed = time.perf_counter() - start
    shutil.rmtree(directory, ignore_errors=True)
    failed = False
    for rank, report in enumerate(reports):
        print(f"rank {rank}: {args.saves} async saves of {args.mib} MiB in {elapsed:.1f}s; committed at the end "
              f"{report['committed']}; blocked first {report['blocked_first_s']:.3f}s, median "
              f"{report['blocked_median_s']:.3f}s")
        print(f"{'':14}{'RSS MiB':>10}{'threads':>9}{'fds':>6}{'children':>10}")
        for name, snap in report["snapshots"].items():
            print(f"{name:<14}{snap['rss'] / (1 << 20):10.1f}{snap['threads']:9d}{snap['fds']:6d}{snap['children']:10d}")
        problems = verdict(report)
        failed |= bool(problems)
        print("  " + ("; ".join(problems) if problems else "all targets held"))
    print(json.dumps(reports))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
