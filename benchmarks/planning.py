"""How long save planning takes for N items per rank on 8 ranks, simulated in one process.

Each simulated rank runs what DCP runs on it (``set_up_planner`` + ``create_local_plan`` of
ForgeSavePlanner on its own topology), then the coordinator's ``create_global_plan`` runs over all
local plans, then every rank's ``finish_plan``. Reported: each phase, the critical path a real job
waits for (slowest local plan + global plan + slowest finish: ranks plan in parallel), and the
in-process total. Tensors live on the ``meta`` device: planning never touches data.

The state imitates a training job: model and optimizer tensors (REPLICATED, a few of them large
enough to be cut into row-chunks), a GLOBAL trainer state, and a PER_RANK RNG state.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from dcp_forge.core.patterns import SharingPattern
from dcp_forge.core.topology import Topology
from dcp_forge.planners import ForgeSavePlanner

_DECLARED = {"model": SharingPattern.REPLICATED, "optimizer": SharingPattern.REPLICATED,
             "trainer": SharingPattern.GLOBAL, "rng": SharingPattern.PER_RANK}


def planning_state(items: int) -> dict[str, Any]:
    """About ``items`` items: tensors split between model and optimizer, one in 200 of 64 MiB."""
    tensors = max(2, items - 4)
    shapes = [(4096, 4096) if i % 200 == 0 else (256, 64 + i % 7) for i in range(tensors)]
    half = tensors // 2
    return {
        "model": {f"layers.{i}.weight": torch.empty(shapes[i], device="meta") for i in range(half)},
        "optimizer": {f"state.{i}.exp_avg": torch.empty(shapes[i], device="meta") for i in range(half, tensors)},
        "trainer": {"step": 1000, "epoch": 3},
        "rng": {"torch": torch.empty(5056, dtype=torch.uint8, device="meta"), "seed": 7},
    }


def simulate_planning(items: int, world: int = 8) -> dict[str, float]:
    """Seconds for each planning phase of one save of ``items`` items per rank on ``world`` ranks."""
    state = planning_state(items)
    planners, plans, local = [], [], []
    for rank in range(world):
        started = time.perf_counter()
        planner = ForgeSavePlanner(_DECLARED, Topology(rank=rank, world_size=world), planning_only=True)
        planner.set_up_planner(dict(state), is_coordinator=rank == 0)
        plans.append(planner.create_local_plan())
        local.append(time.perf_counter() - started)
        planners.append(planner)
    started = time.perf_counter()
    global_plans, _metadata = planners[0].create_global_plan(plans)
    global_seconds = time.perf_counter() - started
    finish = []
    for planner, plan in zip(planners, global_plans, strict=True):
        started = time.perf_counter()
        planner.finish_plan(plan)
        finish.append(time.perf_counter() - started)
    return {"items_per_rank": sum(len(p.items) for p in plans) / world, "local_max": max(local),
            "local_total": sum(local), "global": global_seconds, "finish_max": max(finish),
            "critical_path": max(local) + global_seconds + max(finish),
            "in_process_total": sum(local) + global_seconds + sum(finish)}


def run_planning(sizes: Sequence[int] = (2500, 5000, 10000, 20000), world: int = 8, repetitions: int = 3,
                 log: Callable[[str], None] = print) -> dict[str, Any]:
    """Median seconds per phase for each size, and the per-1,000-item cost (flat = linear)."""
    rows = []
    for items in sizes:
        runs = [simulate_planning(items, world) for _ in range(repetitions)]
        row = {"items": items, "world": world,
               **{k: statistics.median(r[k] for r in runs) for k in runs[0]}}
        row["critical_path_per_1000_items"] = row["critical_path"] / items * 1000
        row["in_process_total_per_1000_items"] = row["in_process_total"] / items * 1000
        rows.append(row)
        log(f"planning {items:>6} items x {world} ranks: critical path {row['critical_path']:.3f} s "
            f"(local {row['local_max']:.3f}, global {row['global']:.3f}, finish {row['finish_max']:.3f}); "
            f"in-process total {row['in_process_total']:.3f} s")
    return {"world": world, "rows": rows}


def format_planning(result: dict[str, Any]) -> str:
    lines = [f"| items per rank (x {result['world']} ranks) | local plan (slowest rank) | global plan | "
             "critical path | per 1,000 items | all ranks in one process |",
             "| ---: | ---: | ---: | ---: | ---: | ---: |"]
    for row in result["rows"]:
        lines.append(f"| {row['items']:,} | {row['local_max']:.3f} s | {row['global']:.3f} s | "
                     f"{row['critical_path']:.3f} s | {row['critical_path_per_1000_items'] * 1000:.1f} ms | "
                     f"{row['in_process_total']:.3f} s |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description='Save planning for N items per rank x 8 ranks, simulated in one process, and how it scales.')
    parser.add_argument("--sizes", type=int, nargs="+", default=[2500, 5000, 10000, 20000], help="items per rank")
    parser.add_argument("--world", type=int, default=8, help="simulated ranks (default 8)")
    parser.add_argument("--repetitions", type=int, default=3, help="repetitions; medians are reported")
    parser.add_argument("--json", default=None, help="also write the results as JSON to this file")
    args = parser.parse_args(argv)
    result = run_planning(args.sizes, args.world, args.repetitions)
    print(format_planning(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
