"""Soak: hundreds of consecutive saves, sync and async, with retention; resources must not grow.

Each rank holds a REPLICATED model (validated at every save, so the replication check's thread and
group are soaked too), its PER_RANK RNG state and a GLOBAL step counter, and trains between saves.
Saves go through the trainers' ``CheckpointManager`` with ``save_total_limit=KEEP``: its retention
deletes older checkpoints (on rank 0) as each save commits.

Reported per rank and mode: RSS, threads, open file descriptors and child processes before the
coordinator exists (start), after the first save, after the last save and after ``close()``.
Targets: RSS after the last save within 5% of after the first; threads, fds and children
no higher after the last save than after the first, and back to the start after ``close()``.

    .venv/bin/python -m tools.soak --saves 200 --mib 64 --world 2          # sync and async, 200 each
    .venv/bin/python -m tools.soak --modes async --saves 100 --mib 256     # the async soak

A short version runs in CI (tests/manager/test_soak.py; tests/coordinator/test_async_soak.py for async alone).
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

from dcp_forge import RNGState, StateComponent, list_checkpoints
from dcp_forge.manager.manager import CheckpointManager, CheckpointPolicy
from tests.support.statefuls import Counter

KEEP = 2  # committed checkpoints kept; older ones are deleted as each save commits
RSS_GROWTH_LIMIT = 0.05
MODES = ("sync", "async")


class Weights:
    """``count`` float32 tensors of ``mib`` MiB together, trained in place between saves."""

    def __init__(self, mib: float, count: int = 8) -> None:
        numel = max(1, int(mib * (1 << 20)) // 4 // count)
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


def soak(rank: int, world: int, directory: str, saves: int, mib: float, use_async: bool = True) -> dict:
    """``saves`` saves of ``mib`` MiB on this rank (async or sync); returns the resource snapshots."""
    warnings.simplefilter("ignore")
    weights, counter = Weights(mib), Counter()
    snapshots = {"start": resources()}
    args = CheckpointPolicy(output_dir=directory, save_steps=1, save_total_limit=KEEP, async_save=use_async,
                            validate_replication=True)
    manager = CheckpointManager(args, [
        StateComponent("model", weights, "replicated", validate_replication=True, validation_level="tensor"),
        StateComponent("rng", RNGState(), "per_rank"),
        StateComponent("trainer", counter, "global"),
    ])
    blocked = []
    for i in range(saves):
        weights.train_step()
        counter.step = i
        started = time.perf_counter()
        manager.save(step=i, epoch=0)  # async: waits for the previous save to commit, then stages
        blocked.append(time.perf_counter() - started)
        weights.train_step()  # with async_save, training goes on while the save uploads
        if i == 0:
            manager.settle()
            snapshots["after_first"] = resources()
    manager.settle()
    snapshots["after_last"] = resources()
    manager.close()
    del manager
    snapshots["after_close"] = resources()
    committed = list_checkpoints(directory)
    return {"mode": "async" if use_async else "sync", "snapshots": snapshots,
            "committed": [os.path.basename(p) for p in committed],
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


def run(modes: tuple[str, ...], saves: int, mib: float, world: int, directory: str | None = None) -> list[dict]:
    """Every mode in turn, each in a fresh output directory; one report per rank and mode."""
    reports = []
    for mode in modes:
        out = tempfile.mkdtemp(prefix=f"soak-{mode}-", dir=directory)
        try:
            if world == 1:
                reports.append(soak(0, 1, out, saves, mib, mode == "async"))
            else:
                from tests.support.dist import run_ranks

                reports += run_ranks(soak, world, out, saves, mib, mode == "async", timeout=3600)
        finally:
            shutil.rmtree(out, ignore_errors=True)
    return reports


def print_reports(reports: list[dict], saves: int, mib: float, world: int, elapsed: float) -> bool:
    """Human-readable report; True when every target held."""
    ok = True
    for i, report in enumerate(reports):
        rank = i % world
        print(f"{report['mode']} rank {rank}: {saves} saves of {mib} MiB; committed at the end {report['committed']}; "
              f"save() blocked first {report['blocked_first_s']:.3f}s, median {report['blocked_median_s']:.3f}s")
        print(f"{'':14}{'RSS MiB':>10}{'threads':>9}{'fds':>6}{'children':>10}")
        for name, snap in report["snapshots"].items():
            print(f"{name:<14}{snap['rss'] / (1 << 20):10.1f}{snap['threads']:9d}{snap['fds']:6d}{snap['children']:10d}")
        problems = verdict(report)
        ok &= not problems
        print("  " + ("; ".join(problems) if problems else "all targets held"))
    print(f"{len(reports)} soaks in {elapsed:.1f}s")
    return ok


def main(argv: list[str] | None = None, default_modes: str = ",".join(MODES), default_saves: int = 200) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", default=default_modes, help="comma-separated: sync, async")
    parser.add_argument("--saves", type=int, default=default_saves)
    parser.add_argument("--mib", type=float, default=64, help="state size per rank")
    parser.add_argument("--world", type=int, default=1)
    parser.add_argument("--dir", default=None, help="parent directory for the output (default: the temp dir)")
    parser.add_argument("--json", action="store_true", help="print the reports as JSON")
    args = parser.parse_args(argv)
    modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
    if not set(modes) <= set(MODES):
        parser.error(f"--modes must name some of {MODES} (got {args.modes!r})")
    start = time.perf_counter()
    reports = run(modes, args.saves, args.mib, args.world, args.dir)
    ok = print_reports(reports, args.saves, args.mib, args.world, time.perf_counter() - start)
    if args.json:
        print(json.dumps(reports))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
