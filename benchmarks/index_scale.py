"""Inspect and diff at scale: two synthetic checkpoints of 1,000,000 items each.

Planning and writing a real million-item checkpoint takes minutes, and what is measured here does
not depend on it: ``inspect`` and ``diff`` read ``index.parquet`` (and the manifest), and read data
only for items whose checksums differ. So each synthetic checkpoint is a committed directory with a
real manifest and index of ``items`` rows whose locations point into one small data file of
distinct tensor blobs (rows share blobs; each row's checksum is its blob's). Checkpoint B differs
from A in ``changed`` tensors (other values) and lacks ``dropped`` keys, so the diff has real work:
join a million rows, find the differing ones, read and compare their values.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from benchmarks.results import write_json
from dcp_forge.format.index import INDEX_SCHEMA
from dcp_forge.format.manifest import (
    CheckpointManifest,
    ComponentManifest,
    CopyManifest,
    checksum_bytes,
    combine_checksums,
    versions,
)
from dcp_forge.format.names import INDEX_FILE, MANIFEST_FILE
from dcp_forge.format.torch_blob import save_tensor
from dcp_forge.ops.diff import diff_checkpoints
from dcp_forge.ops.inspection import summarize_checkpoint
from dcp_forge.storage.lifecycle import CommitRecord, commit
from dcp_forge.storage.registry import open_backend

COMPONENTS = 10
BLOBS = 64
SHAPE = (64, 64)


def _blobs(seed: int) -> list[bytes]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(BLOBS):
        buf = io.BytesIO()
        save_tensor(torch.randn(SHAPE, generator=gen), buf)
        out.append(buf.getvalue())
    return out


def write_synthetic_checkpoint(path: str, items: int, *, changed: int = 0, dropped: int = 0) -> None:
    """A committed checkpoint directory of ``items`` index rows (see the module docstring)."""
    os.makedirs(path)
    blobs = _blobs(0) + (_blobs(1) if changed else [])
    offsets = np.cumsum([0] + [len(b) for b in blobs[:-1]])
    with open(os.path.join(path, "__0_0.distcp"), "wb") as f:
        f.write(b"".join(blobs))
    checksums = np.array([checksum_bytes(b) for b in blobs], dtype=object)

    n = items - dropped
    i = np.arange(n)
    blob = i % BLOBS
    if changed:  # spread the changed rows over the index, each now pointing at a blob of other values
        picked = np.linspace(0, n - 1, changed).astype(np.int64)
        blob[picked] += BLOBS
    component = np.array([f"c{k}" for k in range(COMPONENTS)], dtype=object)[i % COMPONENTS]
    fqn = np.char.add(np.char.add(component.astype(str), ".layers."), i.astype(str))
    fqn = np.char.add(fqn, ".weight")
    lengths = np.array([len(b) for b in blobs], dtype=np.int64)
    list_offsets = pa.array(np.arange(0, 2 * n + 1, 2, dtype=np.int32))

    def pairs(value: tuple[int, int]) -> pa.ListArray:
        return pa.ListArray.from_arrays(list_offsets, pa.array(np.tile(np.array(value, dtype=np.int64), n)))

    columns = {
        "component": pa.array(component, pa.string()), "pattern": pa.array(["replicated"] * n, pa.string()),
        "storage_key": pa.array(component, pa.string()), "fqn": pa.array(fqn, pa.string()),
        "kind": pa.array(["tensor"] * n, pa.string()), "dtype": pa.array(["torch.float32"] * n, pa.string()),
        "shape": pairs(SHAPE), "chunk_offsets": pairs((0, 0)), "chunk_sizes": pairs(SHAPE),
        "file": pa.array(["__0_0.distcp"] * n, pa.string()), "offset": pa.array(offsets[blob], pa.int64()),
        "length": pa.array(lengths[blob], pa.int64()), "checksum": pa.array(checksums[blob], pa.string()),
        "rank": pa.array((i % 8).astype(np.int32), pa.int32()),
        "data_offset": pa.nulls(n, pa.int64()),  # the blobs are tiny: below LAYOUT_MIN_BYTES
        "key_path": pa.nulls(n, pa.string()),  # string keys, plain tensors
        "math_bits": pa.nulls(n, pa.string()),
        "gap_offset": pa.nulls(n, pa.int64()),  # each blob a zip of its own, as before packs
        "gap_length": pa.nulls(n, pa.int64()),
    }
    table = pa.table(columns, schema=INDEX_SCHEMA)
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    index_bytes = sink.getvalue()

    components = {}
    sizes = {r["component"]: r["length_sum"] for r in table.group_by("component").aggregate([("length", "sum")]).to_pylist()}
    for k in range(COMPONENTS):
        key = f"c{k}"
        mine = checksums[blob[i % COMPONENTS == k]].tolist()
        checksum = combine_checksums(mine)
        copy = CopyManifest(holders=list(range(8)), writers=list(range(8)), size_bytes=int(sizes[key]), checksum=checksum)
        components[key] = ComponentManifest(key=key, sharing_pattern="replicated", ranks=list(range(8)),
                                            replicated_across=list(range(8)), group_name=None,
                                            size_bytes=int(sizes[key]), checksum=combine_checksums([checksum]),
                                            copies={key: copy})
    manifest = CheckpointManifest(
        checkpoint_path=path, world_size=8, timestamp=datetime.now(UTC), components=components,
        versions=versions(), topology={"world_size": 8, "node_of_rank": [0] * 8, "groups": {}},
        files={INDEX_FILE: checksum_bytes(index_bytes)}, extra={"synthetic": True})
    manifest_bytes = manifest.to_json().encode()
    backend, path = open_backend(path)
    backend.write_bytes(os.path.join(path, INDEX_FILE), index_bytes)
    backend.write_bytes(os.path.join(path, MANIFEST_FILE), manifest_bytes)
    commit(backend, path, CommitRecord(checkpoint_id=os.path.basename(path), save_id="synthetic",
                                       committed_at=time.time(), manifest_checksum=checksum_bytes(manifest_bytes)))


def _median_seconds(fn: Callable[[], Any], repetitions: int) -> tuple[float, Any]:
    times, result = [], None
    for _ in range(repetitions):
        started = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times), result


def _cli_seconds(*args: str) -> float:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [
        os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), os.environ.get("PYTHONPATH")])))
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "dcp_forge.cli", *args], env=env, check=False,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def run_index_scale(items: int = 1_000_000, changed: int = 10, dropped: int = 5, repetitions: int = 3,
                    directory: str | None = None, log: Callable[[str], None] = print,
                    cli: bool = True) -> dict[str, Any]:
    """Median seconds of inspect (A), diff A↔B (``changed`` tensors differ: rows align, compared
    positionally) and diff A↔C (also ``dropped`` keys missing: compared by a join), as library calls
    and (``cli``) as ``dcp-forge`` commands in a fresh interpreter."""
    root = tempfile.mkdtemp(prefix="forge-index-bench-", dir=directory)
    try:
        a, b, c = (os.path.join(root, name) for name in "abc")
        started = time.perf_counter()
        write_synthetic_checkpoint(a, items)
        write_synthetic_checkpoint(b, items, changed=changed)
        write_synthetic_checkpoint(c, items, changed=changed, dropped=dropped)
        log(f"synthetic checkpoints of {items:,} items written in {time.perf_counter() - started:.1f} s")
        inspect_s, summary = _median_seconds(lambda: summarize_checkpoint(a), repetitions)
        diff_s, diffs = _median_seconds(lambda: diff_checkpoints(a, b), repetitions)
        join_s, joined = _median_seconds(lambda: diff_checkpoints(a, c), repetitions)
        if summary.items != items or len(diffs) != changed or len(joined) != changed + dropped:
            raise RuntimeError(f"index benchmark sanity check failed: inspect saw {summary.items} items "
                               f"(expected {items}), diffs found {len(diffs)} and {len(joined)} differences "
                               f"(expected {changed} and {changed + dropped})")
        result = {"items": items, "changed": changed, "dropped": dropped, "inspect_seconds": inspect_s,
                  "diff_seconds": diff_s, "diff_join_seconds": join_s,
                  "index_bytes": os.path.getsize(os.path.join(a, INDEX_FILE)),
                  "cli_inspect_seconds": _cli_seconds("inspect", a) if cli else None,
                  "cli_diff_seconds": _cli_seconds("diff", a, b) if cli else None,
                  "cli_diff_join_seconds": _cli_seconds("diff", a, c) if cli else None}
        log(f"index {items:,} items: inspect {inspect_s:.3f} s, diff {diff_s:.3f} s, diff with dropped keys "
            f"{join_s:.3f} s")
        return result
    finally:
        shutil.rmtree(root, ignore_errors=True)


def format_index_scale(result: dict[str, Any]) -> str:
    def cli(key: str) -> str:
        return "-" if result[key] is None else f"{result[key]:.2f} s"

    return "\n".join([
        f"| {result['items']:,}-item checkpoint ({result['index_bytes'] / 2**20:.1f} MiB index) | library call | "
        "`dcp-forge` command (incl. interpreter start, imports) |",
        "| --- | ---: | ---: |",
        f"| inspect | {result['inspect_seconds']:.2f} s | {cli('cli_inspect_seconds')} |",
        f"| diff, {result['changed']} tensors changed | {result['diff_seconds']:.2f} s | "
        f"{cli('cli_diff_seconds')} |",
        f"| diff, {result['changed']} changed + {result['dropped']} keys dropped | {result['diff_join_seconds']:.2f} s | "
        f"{cli('cli_diff_join_seconds')} |",
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description='inspect and diff of checkpoints with a 1,000,000-item index (synthetic).')
    parser.add_argument("--items", type=int, default=1_000_000, help="rows of each synthetic index")
    parser.add_argument("--repetitions", type=int, default=3, help="repetitions; medians are reported")
    parser.add_argument("--dir", default=None, help="scratch directory (default: the temp dir)")
    parser.add_argument("--no-cli", action="store_true", help="skip timing the dcp-forge commands")
    parser.add_argument("--json", default=None, help="also write the results as JSON to this file")
    args = parser.parse_args(argv)
    result = run_index_scale(args.items, repetitions=args.repetitions, directory=args.dir, cli=not args.no_cli)
    print(format_index_scale(result))
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
