"""Replication-validation overhead: how much does ``save_checkpoint(validate=True)`` add to a save?

Runs ``--world`` real gloo ranks holding the same REPLICATED state (``--mib`` MiB in ``--tensors``
tensors) and, interleaved over ``--reps`` rounds, times on every rank (between barriers):

- a plain save (durable: data fsynced, committed), the reference;
- ``check_replication`` alone at each level (QUICK, TENSOR, FULL);
- a save with ``validate=True`` at each level.

and reports medians and the overhead ratios against the plain save measured in the same run, plus
the raw xxh3 hashing rate of this machine. Targets: TENSOR <= 10 %, QUICK <= 3 %.

    .venv/bin/python -m benchmarks.replication --mib 1024 --reps 5
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

from tests.support.statefuls import Box


def _state(mib: int, tensors: int):
    import torch

    gen = torch.Generator().manual_seed(0)  # the same on every rank: truly replicated
    per = mib * 1024 * 1024 // 4 // tensors
    return {f"layer{i}": {"weight": torch.randn(per, generator=gen)} for i in range(tensors)}


def _rank(rank: int, world: int, out_dir: str, mib: int, tensors: int, reps: int, levels: list[str]) -> dict:
    import random

    import torch.distributed as dist

    from dcp_forge import CheckpointCoordinator, StateComponent, delete_checkpoint
    from dcp_forge.replication import check_replication

    state = _state(mib, tensors)
    coords = {level: CheckpointCoordinator(
        [StateComponent("model", Box(state), "replicated", validate_replication=True, validation_level=level)],
        output_dir=out_dir) for level in levels}
    times: dict[str, list[float]] = {"save": [], **{f"check_{lv}": [] for lv in levels},
                                     **{f"save_{lv}": [] for lv in levels}}

    def timed(name: str, fn) -> None:
        dist.barrier()
        start = time.perf_counter()
        fn()
        dist.barrier()
        times[name].append(time.perf_counter() - start)

    def save(level: str, validate: bool, name: str) -> None:
        path = coords[level].checkpoint_path(name)
        timed(f"save_{level}" if validate else "save",
              lambda: coords[level].save_checkpoint(checkpoint_id=name, validate=validate))
        if rank == 0:
            delete_checkpoint(path)
        dist.barrier()

    save(levels[0], False, "warmup")
    order = random.Random(0)  # the same shuffles on every rank
    for rep in range(reps):
        runs = ["plain", *levels]
        order.shuffle(runs)  # no level always follows another: page cache and writeback drift evenly
        for run in runs:
            if run == "plain":
                save(levels[0], False, f"plain-{rep}")
            else:
                coord = coords[run]
                timed(f"check_{run}", lambda c=coord: check_replication(c.components, c.topology, c.group))
                save(run, True, f"{run}-{rep}")
    return times


def _hash_rate(mib: int) -> float:
    import torch

    from dcp_forge.replication import raw_bytes

    t = torch.randn(mib * 1024 * 1024 // 4)
    import xxhash

    xxhash.xxh3_64_hexdigest(raw_bytes(t))
    start = time.perf_counter()
    xxhash.xxh3_64_hexdigest(raw_bytes(t))
    return t.nbytes / (time.perf_counter() - start) / 1e9


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=int, default=1024, help="state size per rank (MiB)")
    parser.add_argument("--tensors", type=int, default=64)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--levels", default="quick,tensor,full", help="comma-separated validation levels")
    parser.add_argument("--output-dir", default=None, help="where to save (default: a temp dir under .bench/)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)

    from tests.support.dist import run_ranks

    base = args.output_dir or ".bench"
    os.makedirs(base, exist_ok=True)
    out_dir = tempfile.mkdtemp(prefix="validation-", dir=base)
    try:
        levels = [lv.strip() for lv in args.levels.split(",") if lv.strip()]
        per_rank = run_ranks(_rank, args.world, out_dir, args.mib, args.tensors, args.reps, levels, timeout=3600)
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    # A step takes as long as its slowest rank: take the max over ranks, then the median over rounds.
    step = {name: [max(r[name][i] for r in per_rank) for i in range(args.reps)] for name in per_rank[0]}
    med = {name: statistics.median(values) for name, values in step.items()}
    # Each round's validated save against that round's plain save, then the median: drift cancels.
    paired = {lv: statistics.median(v / p - 1 for v, p in zip(step[f"save_{lv}"], step["save"], strict=True))
              for lv in levels}
    best = {name: min(values) for name, values in step.items()}  # least disturbed by other tenants
    result = {
        "world": args.world, "mib": args.mib, "tensors": args.tensors, "reps": args.reps,
        "hash_gb_per_s": round(_hash_rate(min(args.mib, 256)), 2),
        "save_s": round(med["save"], 4), "save_best_s": round(best["save"], 4),
        "save_gb_per_s": round(args.mib / 1024 * 1.073741824 / med["save"], 3),
        "levels": {lv: {"check_s": round(med[f"check_{lv}"], 4),
                        "check_over_save": round(med[f"check_{lv}"] / med["save"], 4),
                        "validated_save_s": round(med[f"save_{lv}"], 4),
                        "validated_save_overhead": round(paired[lv], 4),
                        "validated_save_best_s": round(best[f"save_{lv}"], 4),
                        "best_overhead": round(best[f"save_{lv}"] / best["save"] - 1, 4)}
                   for lv in levels},
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"world {args.world}, {args.mib} MiB replicated in {args.tensors} tensors, median of {args.reps} "
          f"(xxh3 on this machine: {result['hash_gb_per_s']} GB/s per thread)")
    print(f"plain save: median {result['save_s']:.3f} s ({result['save_gb_per_s']} GB/s of state), "
          f"best {result['save_best_s']:.3f} s")
    print(f"{'level':<8} {'check s':>9} {'check/save':>11} {'validated save s':>17} {'overhead':>9} {'best s':>8} "
          f"{'best ovh':>9}")
    for lv, r in result["levels"].items():
        print(f"{lv:<8} {r['check_s']:>9.4f} {r['check_over_save']:>10.1%} {r['validated_save_s']:>17.3f} "
              f"{r['validated_save_overhead']:>9.1%} {r['validated_save_best_s']:>8.3f} {r['best_overhead']:>9.1%}")
    print("check: the check alone, run sequentially (median); overhead: a validate=True save against the plain "
          "save of the same round (median of rounds); best: fastest of the rounds")
    return 0


if __name__ == "__main__":
    sys.exit(main())
