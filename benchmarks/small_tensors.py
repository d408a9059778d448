"""Many small tensors on one rank: dcp_forge against ``torch.save`` / ``torch.load`` (and optionally
DCP's ``FileSystemWriter``), side by side in one run.

For each count (default 10,000 and 100,000) the state is that many float32 tensors of 4 to 256
elements (uniformly drawn, fixed seed), named like a model's small parameters. Every repetition
saves it with each contender (``torch.save`` + fsync of the file and directory; dcp_forge's
``save_checkpoint``), then loads each saved copy from a cold page cache into preallocated tensors
(``torch.load`` + copy; dcp_forge's ``load_checkpoint``), and checks the loaded values. The order of
the contenders alternates between repetitions; ratios are taken within a repetition and reported as
medians. Bytes on disk are every file of the saved directory.

``--floor`` adds a save that writes nothing: ``dcp.save`` with DCP's default planner and a storage
writer that reads every item's data and pickles the metadata, as ``FileSystemWriter`` does, to
memory, with the collector paused as dcp_forge's saves run. It is what any save that plain DCP can
read pays before a byte reaches the disk (DCP's per-item plan and metadata objects, their pickle).
"""

from __future__ import annotations

import argparse
import os
import pickle
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner
from torch.distributed.checkpoint.storage import StorageWriter, WriteResult
from torch.futures import Future

from benchmarks.disk import drop_page_cache
from benchmarks.results import write_json
from benchmarks.save_load import _forge_load, _forge_save, _torch_load, _torch_save
from dcp_forge.gc_pause import paused_gc

Action = Callable[[str, dict[str, torch.Tensor]], None]


def _dcp_save(path: str, state: dict[str, torch.Tensor]) -> None:
    dcp.save({"model": state}, storage_writer=FileSystemWriter(path, thread_count=2), no_dist=True)


def _dcp_load(path: str, state: dict[str, torch.Tensor]) -> None:
    dcp.load({"model": state}, storage_reader=FileSystemReader(path), no_dist=True)


class _WritesNothing(StorageWriter):
    """DCP's storage writer protocol with no storage: every item's data is resolved (a writer must
    read it) and the metadata pickled as ``FileSystemWriter.finish`` pickles it, into memory."""

    def reset(self, checkpoint_id: Any = None) -> None:
        pass

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: Any) -> bool:
        return True

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        pass

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        return plans

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        results = []
        for at, item in enumerate(plan.items):
            planner.resolve_data(item)
            results.append(WriteResult(index=item.index, size_in_bytes=1,
                                       storage_data=_StorageInfo("__0_0.distcp", at, 1)))
        done: Future[list[WriteResult]] = Future()
        done.set_result(results)
        return done

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        metadata.storage_data = {result.index: result.storage_data for rank in results for result in rank}
        metadata.storage_meta = self.storage_meta()
        pickle.dumps(metadata)

    def storage_meta(self) -> StorageMeta | None:
        return StorageMeta()


def _floor_save(path: str, state: dict[str, torch.Tensor]) -> None:
    with paused_gc():
        dcp.save({"model": state}, storage_writer=_WritesNothing(), no_dist=True)


# name -> (save, load); a contender without a load only saves
CONTENDERS: dict[str, tuple[Action, Action | None]] = {
    "torch.save / torch.load": (_torch_save, _torch_load),
    "dcp_forge": (_forge_save, _forge_load),
    "DCP FileSystemWriter (thread_count=2) / FileSystemReader": (_dcp_save, _dcp_load),
    "DCP's save protocol, nothing written": (_floor_save, None),
}
REFERENCE = "torch.save / torch.load"
FLOOR = "DCP's save protocol, nothing written"


def make_state(count: int, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    sizes = torch.randint(4, 257, (count,), generator=gen).tolist()
    kinds = ("norm.weight", "norm.bias", "attn.q_norm", "mlp.bias")
    return {f"layers.{i // len(kinds)}.{kinds[i % len(kinds)]}": torch.randn(n, generator=gen)
            for i, n in enumerate(sizes)}


def _bytes_on_disk(path: str) -> int:
    return sum(os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(path) for name in names)


def _timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run_count(count: int, repetitions: int, root: str, contenders: Sequence[str],
              log: Callable[[str], None] = print) -> dict[str, Any]:
    """Save and load ``count`` small tensors ``repetitions`` times with each of ``contenders``."""
    state = make_state(count)
    target = {k: torch.zeros_like(v) for k, v in state.items()}
    seconds: dict[str, dict[str, list[float]]] = {name: {"save": [], "load": []} for name in contenders}
    sizes: dict[str, int] = {}
    for rep in range(repetitions):
        order = list(contenders) if rep % 2 == 0 else list(reversed(contenders))
        rep_dir = os.path.join(root, f"n{count}-rep{rep}")
        os.makedirs(rep_dir)
        for name in order:
            save, _ = CONTENDERS[name]
            path = os.path.join(rep_dir, name.split()[0].strip("/"))
            seconds[name]["save"].append(_timed(lambda save=save, path=path: save(path, state)))
            sizes[name] = _bytes_on_disk(path) if os.path.exists(path) else 0
        for name in order:
            _, load = CONTENDERS[name]
            if load is None:
                continue
            path = os.path.join(rep_dir, name.split()[0].strip("/"))
            drop_page_cache(path)
            for value in target.values():
                value.zero_()
            seconds[name]["load"].append(_timed(lambda load=load, path=path: load(path, target)))
            bad = [k for k in state if not torch.equal(target[k], state[k])]
            if bad:
                raise AssertionError(f"{name} loaded {len(bad)} wrong tensor(s), e.g. {bad[0]}")
        log(f"  {count} tensors, repetition {rep + 1}/{repetitions}: " + ", ".join(
            f"{name.split()[0]} save {seconds[name]['save'][-1]:.2f}s"
            + (f" load {seconds[name]['load'][-1]:.2f}s" if seconds[name]["load"] else "") for name in contenders))
        shutil.rmtree(rep_dir)
    ref = seconds[REFERENCE]
    rows = {}
    for name in contenders:
        row: dict[str, Any] = {"bytes": sizes[name], "bytes_ratio": sizes[name] / sizes[REFERENCE]}
        for phase in ("save", "load"):
            if not seconds[name][phase]:
                continue
            ratios = [mine / theirs for mine, theirs in zip(seconds[name][phase], ref[phase], strict=True)]
            row[phase] = {"seconds": seconds[name][phase], "median_s": statistics.median(seconds[name][phase]),
                          "ratio_median": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios)}
        rows[name] = row
    return {"count": count, "state_bytes": sum(v.nbytes for v in state.values()), "repetitions": repetitions,
            "contenders": rows}


def format_table(results: Sequence[dict[str, Any]]) -> str:
    lines = ["| tensors | contender | save s (median) | × torch.save (median, min–max) | load s (median) | "
             "× torch.load (median, min–max) | bytes on disk | × torch.save |",
             "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for result in results:
        for name, row in result["contenders"].items():
            save, load = row["save"], row.get("load")
            loaded = (f"{load['median_s']:.2f} | {load['ratio_median']:.2f} "
                      f"({load['ratio_min']:.2f}–{load['ratio_max']:.2f})" if load else "– | –")
            stored = f"{row['bytes'] / 1e6:.1f} MB | {row['bytes_ratio']:.2f}" if row["bytes"] else "– | –"
            lines.append(
                f"| {result['count']:,} | {name} | {save['median_s']:.2f} | {save['ratio_median']:.2f} "
                f"({save['ratio_min']:.2f}–{save['ratio_max']:.2f}) | {loaded} | {stored} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Many small tensors (4-256 float32 elements) on one rank: "
                                                 "dcp_forge vs torch.save / torch.load, side by side.")
    parser.add_argument("--counts", type=int, nargs="+", default=[10_000, 100_000], help="tensor counts")
    parser.add_argument("--repetitions", type=int, default=3, help="repetitions per count (medians reported)")
    parser.add_argument("--dcp", action="store_true", help="also run DCP's FileSystemWriter / FileSystemReader")
    parser.add_argument("--floor", action="store_true",
                        help="also run DCP's save protocol writing nothing (what a DCP-readable save pays first)")
    parser.add_argument("--dir", default=None, help="directory on the disk to measure (default: the temp dir)")
    parser.add_argument("--json", default=None, help="also write the results as JSON to this file")
    args = parser.parse_args(argv)
    contenders = [REFERENCE, "dcp_forge"] + (["DCP FileSystemWriter (thread_count=2) / FileSystemReader"]
                                             if args.dcp else []) + ([FLOOR] if args.floor else [])
    import warnings

    warnings.filterwarnings("ignore", message="torch.distributed is disabled")
    results = []
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="forge-small-") as root:
        for count in args.counts:
            results.append(run_count(count, args.repetitions, root, contenders))
    print(format_table(results))
    write_json(args.json, {"results": results, "load_average": os.getloadavg(), "cpus": os.cpu_count()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
