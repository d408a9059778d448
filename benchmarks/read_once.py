#!/usr/bin/env python
"""Read-once loading: bytes read from storage and load time at world 2 and 4, against plain
DCP loading of the same checkpoint.

    .venv/bin/python -m benchmarks.read_once [--worlds 2 4] [--size-mib 256] [--tensors 8]
                                              [--repetitions 3] [--dir DIR | --url URL
                                              --storage-options JSON] [--hot] [--json out.json]

Each world size runs as that many gloo ranks on this machine. The ranks save one REPLICATED state
(``size-mib`` MiB of float32 tensors, the same on every rank) with dcp_forge, under ``--dir`` (default:
the temp dir) or any fsspec ``--url`` (e.g. ``s3://bucket/prefix`` with ``--storage-options
'{"endpoint_url": ...}'``), then load it back into preallocated tensors, each load of a local checkpoint
from a cold page cache (``--hot``: from a warm one), with:

- ``dcp``: plain ``dcp.load`` with DCP's ``FileSystemReader`` (``FsspecReader`` for a URL; every rank
  reads what it needs);
- ``forge``: ``load_checkpoint(read_once=False)`` (the same, through dcp_forge's reader);
- ``forge read-once``: ``load_checkpoint(read_once=True)`` (each stored byte read by one rank, the rest
  sent over gloo).

Bytes read are counted in the storage layer (``ForgeStorageReader.bytes_read``; for DCP, the bytes of
every file slice its reader opens) and summed over ranks; ``read / unique`` divides by the bytes the
checkpoint stores. Times are the slowest rank's, between barriers; the contenders' order rotates
between repetitions and medians are reported. Every load is checked against the saved values.

On one machine the page cache is shared by all ranks, so N ranks reading the same file cost the disk
about one read: read-once saves storage traffic (what object stores and shared filesystems bill and
throttle), not local-disk time, and here pays for the gloo transfers instead.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
import warnings

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from torch.distributed.checkpoint import FileSystemReader

from benchmarks.disk import drop_page_cache
from benchmarks.results import write_json
from benchmarks.save_load import SaveLoadConfig, _TensorDict, make_state
from dcp_forge import CheckpointCoordinator, StateComponent, delete_checkpoint, read_manifest
from dcp_forge._torch_compat import fsspec_reader_class
from dcp_forge.storage import redact_url

CONTENDERS = ("dcp", "forge", "forge read-once")


class CountingFileSystemReader(FileSystemReader):
    """DCP's local reader, counting the stored bytes of every file slice it reads."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.bytes_read = 0

    def _slice_file(self, file, sinfo):
        self.bytes_read += sinfo.length
        return super()._slice_file(file, sinfo)


class CountingFsspecReader(fsspec_reader_class()):
    """DCP's fsspec reader, counting the same way."""

    def __init__(self, path: str, storage_options: dict) -> None:
        super().__init__(path, **storage_options)
        self.bytes_read = 0

    def _slice_file(self, file, sinfo):
        self.bytes_read += sinfo.length
        return super()._slice_file(file, sinfo)


def _load_once(contender: str, coord: CheckpointCoordinator, path: str, target: dict) -> int:
    if contender == "dcp":
        if "://" in path:
            reader: CountingFileSystemReader | CountingFsspecReader = CountingFsspecReader(path, coord.storage_options)
        else:
            reader = CountingFileSystemReader(path)
        dcp.load({"model": target}, storage_reader=reader)
        return reader.bytes_read
    result = coord.load_checkpoint(path, read_once=contender == "forge read-once")
    return result.bytes_read


def _rank(rank: int, world: int, init_file: str, args: argparse.Namespace, root: str, out: str) -> None:
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    options = json.loads(args.storage_options)
    local = "://" not in root
    try:
        saved = make_state(SaveLoadConfig(size_mib=args.size_mib, tensors=args.tensors))
        path = CheckpointCoordinator([StateComponent("model", _TensorDict(saved), "replicated")], output_dir=root,
                                     storage_options=options).save_checkpoint(checkpoint_id="c")
        target = {k: torch.empty_like(v) for k, v in saved.items()}
        coord = CheckpointCoordinator([StateComponent("model", _TensorDict(target), "replicated")],
                                      output_dir=root, storage_options=options)
        samples: dict[str, list[tuple[float, int]]] = {c: [] for c in CONTENDERS}
        for rep in range(args.repetitions):
            order = CONTENDERS[rep % len(CONTENDERS):] + CONTENDERS[:rep % len(CONTENDERS)]
            for contender in order:
                for t in target.values():
                    t.zero_()
                if rank == 0 and local and not args.hot:
                    drop_page_cache(path)
                dist.barrier()
                start = time.perf_counter()
                read = _load_once(contender, coord, path, target)
                dist.barrier()
                elapsed = time.perf_counter() - start
                if not all(torch.equal(target[k], saved[k]) for k in saved):
                    raise RuntimeError(f"rank {rank}: {contender} loaded wrong values")
                reads: list[int] = [0] * world
                dist.all_gather_object(reads, read)
                samples[contender].append((elapsed, sum(reads)))
        dist.barrier()
        if rank == 0:
            unique = read_manifest(path, options).components["model"].size_bytes
            with open(out, "w") as f:
                json.dump({"world": world, "unique_bytes": unique, "samples": samples}, f)
            if not local:
                delete_checkpoint(path, options)
    finally:
        dist.destroy_process_group()


def run_world(world: int, args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        out = os.path.join(tmp, "result.json")
        root = (f"{args.url.rstrip('/')}/bench-read-once-{uuid.uuid4().hex[:8]}-w{world}" if args.url
                else os.path.join(tmp, "ckpt"))
        mp.spawn(_rank, args=(world, os.path.join(tmp, "rendezvous"), args, root, out), nprocs=world, join=True)
        with open(out) as f:
            raw = json.load(f)
    rows = []
    for contender in CONTENDERS:
        times = [t for t, _ in raw["samples"][contender]]
        read = statistics.median(b for _, b in raw["samples"][contender])
        seconds = statistics.median(times)
        rows.append({"contender": contender, "seconds": seconds, "bytes_read": read,
                     "read_over_unique": read / raw["unique_bytes"],
                     "gbps_per_rank": raw["unique_bytes"] / seconds / 1e9})
    return {"world": world, "unique_bytes": raw["unique_bytes"], "rows": rows}


def format_table(results: list[dict], args: argparse.Namespace) -> str:
    where = redact_url(args.url) if args.url else f"local disk, {'warm' if args.hot else 'cold'} page cache"
    lines = [f"{args.size_mib} MiB REPLICATED state, {where}, median of {args.repetitions}",
             "", "| world | contender | load s | state GB/s per rank | bytes read / unique |",
             "| ---: | --- | ---: | ---: | ---: |"]
    for result in results:
        for row in result["rows"]:
            lines.append(f"| {result['world']} | {row['contender']} | {row['seconds']:.3f} | "
                         f"{row['gbps_per_rank']:.2f} | {row['read_over_unique']:.2f}x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worlds", type=int, nargs="+", default=[2, 4], help="world sizes (default 2 4)")
    parser.add_argument("--size-mib", type=int, default=256, help="state size in MiB (default 256)")
    parser.add_argument("--tensors", type=int, default=8, help="number of equal float32 tensors (default 8)")
    parser.add_argument("--repetitions", type=int, default=3, help="repetitions; medians reported (default 3)")
    parser.add_argument("--dir", default=None, help="directory for the checkpoint (default: the temp dir)")
    parser.add_argument("--url", default=None, help="fsspec URL to save under instead of --dir (e.g. s3://bucket/x)")
    parser.add_argument("--storage-options", default="{}", help="JSON storage options for --url (fsspec)")
    parser.add_argument("--hot", action="store_true", help="load from a warm page cache instead of a cold one")
    parser.add_argument("--json", default=None, help="also write the results as JSON to this file")
    args = parser.parse_args(argv)
    try:
        SaveLoadConfig(size_mib=args.size_mib, tensors=args.tensors, repetitions=args.repetitions)
    except ValueError as err:
        parser.error(str(err))
    results = [run_world(world, args) for world in args.worlds]
    print(format_table(results, args))
    write_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
