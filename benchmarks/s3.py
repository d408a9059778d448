#!/usr/bin/env python
"""Whole checkpoints on S3: dcp_forge save/load against the raw clients moving the same bytes.

Starts its own SeaweedFS (``tests/support/s3_server.py``, data on local disk), builds a state of float32
tensors and saves it once with dcp_forge to learn which data objects a save writes (its
``__<rank>_<n>.distcp`` files). Then, in rounds, every contender runs once per round (round-robin,
the starting contender rotating), and the median and best MB/s over the rounds are reported
(1 MB = 10^6 bytes of those data objects):

- saves: dcp_forge ``save_checkpoint`` with ``data_client`` arrow and s3fs (the whole save: claim,
  data, index/metadata/manifest, commit marker); raw pyarrow writing the same objects' bytes, one
  stream per object as dcp_forge does, in 8/16/32 MiB pieces (each piece one multipart part); raw
  s3fs ``pipe_file`` (parallel parts) and ``open``/write of the same objects;
- loads: dcp_forge ``load_checkpoint`` into preallocated tensors (checksums verified) with both data
  clients; raw pyarrow ``readinto`` of those objects (tensor-sized ranges, one thread per object, as
  dcp_forge's reader threads do; and 16 MiB ranges on more threads); raw s3fs ranged ``cat_file``.

Loaded tensors and raw reads are compared with what was saved, outside the timing. The ratios are
dcp_forge's median over the best raw client's median (the fastest raw variant of either client).

    python -m benchmarks.s3 [--size-mib 512] [--tensors 8] [--repeats 5] [--quick] [--json out.json]
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import statistics
import sys
import uuid
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from benchmarks import s3_clients as B
from benchmarks.save_load import SaveLoadConfig, _TensorDict, make_state
from dcp_forge import CheckpointCoordinator, SharingPattern, StateComponent
from tests.support import s3_clients as C
from tests.support import s3_server

MiB = 2**20
BUCKET = "bench"
Files = Mapping[str, memoryview]  # object name -> its bytes


@dataclass
class Contender:
    op: str  # "save" | "load"
    kind: str  # "dcp_forge" | "pyarrow" | "s3fs"
    name: str
    run: Callable[[int], None]  # the timed part; the argument is the round
    after: Callable[[int], None] = lambda rep: None  # untimed: cleanup, verification
    samples: list[tuple[float, float, float]] = field(default_factory=list)


# ----------------------------------------------------------------------------------- dcp_forge

def forge_contenders(options: dict, client: str, state: dict[str, torch.Tensor],
                     target: dict[str, torch.Tensor], thread_count: int, ctl) -> list[Contender]:
    opts = {**options, "data_client": client}
    out = f"s3://{BUCKET}/forge-{client}-{thread_count}"

    def coordinator(tensors):
        return CheckpointCoordinator([StateComponent("model", _TensorDict(tensors), SharingPattern.REPLICATED)],
                                     output_dir=out, storage_options=opts, thread_count=thread_count)
    saver, loader = coordinator(state), coordinator(target)
    saved: list[str] = []
    loadable = saver.save_checkpoint(checkpoint_id="loadable")

    def save(rep: int) -> None:
        saved.append(saver.save_checkpoint(checkpoint_id=f"save-{rep}-{uuid.uuid4().hex[:6]}"))

    def after_save(rep: int) -> None:
        ctl.rm(saved.pop().split("://", 1)[1], recursive=True)

    def before_load() -> None:
        for t in target.values():
            t.zero_()

    def load(rep: int) -> None:
        loader.load_checkpoint(loadable)

    def after_load(rep: int) -> None:
        bad = [k for k, t in state.items() if not torch.equal(t, target[k])]
        if bad:
            raise AssertionError(f"dcp_forge ({client}) loaded different values for {bad[:3]}")
        before_load()
    before_load()
    loader.load_checkpoint(loadable)  # warm-up (first-use imports and client sessions), checked
    after_load(-1)
    name = f"save_checkpoint, data_client={client}, thread_count={thread_count}"
    return [Contender("save", "dcp_forge", name, save, after_save),
            Contender("load", "dcp_forge", f"load_checkpoint, data_client={client}, thread_count={thread_count}",
                      load, after_load)]


def forge_data_files(ctl, options: dict, state: dict[str, torch.Tensor], thread_count: int) -> dict[str, bytes]:
    """The data objects one dcp_forge save writes, with their bytes: what the raw clients move."""
    path = CheckpointCoordinator(
        [StateComponent("model", _TensorDict(state), SharingPattern.REPLICATED)], output_dir=f"s3://{BUCKET}/ref",
        storage_options=options, thread_count=thread_count).save_checkpoint(checkpoint_id="ref")
    native = path.split("://", 1)[1]
    names = [p.rsplit("/", 1)[1] for p in ctl.ls(native, refresh=True) if p.endswith(".distcp")]
    files = {n: ctl.cat_file(f"{native}/{n}") for n in sorted(names)}
    ctl.rm(native, recursive=True)
    return files


# -------------------------------------------------------------------------------------- raw clients

def per_object(one: Callable[[str, memoryview], object], files: Files) -> Callable[[str], None]:
    """``one(path, bytes)`` for every object at once, one thread each (dcp_forge: a thread per file)."""
    def run(prefix: str) -> None:
        with cf.ThreadPoolExecutor(len(files)) as ex:
            list(ex.map(lambda kv: one(f"{prefix}/{kv[0]}", kv[1]), files.items()))
    return run


def raw_save(kind: str, name: str, one: Callable[[str, memoryview], object], files: Files, ctl) -> Contender:
    run = per_object(one, files)
    prefix = f"{BUCKET}/raw-w/{uuid.uuid4().hex[:8]}"
    return Contender("save", kind, name, lambda rep: run(f"{prefix}/{rep}"),
                     lambda rep: ctl.rm(f"{prefix}/{rep}", recursive=True))


def raw_load(kind: str, name: str, read_into: Callable[[str, memoryview], None], files: Files,
             src: str, buffers: Files) -> Contender:
    """Reads every object of ``src`` into its preallocated buffer, one thread per object."""

    def run(rep: int) -> None:
        with cf.ThreadPoolExecutor(len(files)) as ex:
            list(ex.map(lambda n: read_into(f"{src}/{n}", buffers[n]), files))

    def after(rep: int) -> None:
        bad = [n for n in files if buffers[n].obj != files[n].obj]
        if bad:
            raise AssertionError(f"{kind} {name}: read back different bytes for {bad}")
        for b in buffers.values():
            b[:] = bytes(len(b))
    return Contender("load", kind, name, run, after)


def raw_contenders(settings, files: Files, ctl, tensor_bytes: int, quick: bool) -> list[Contender]:
    import pyarrow as pa

    io_threads = pa.io_thread_count()  # process-wide: left as dcp_forge runs with it
    n = len(files)
    saves = [raw_save("pyarrow", f"open_output_stream x{n}, 16 MiB pieces",
                      B.w_arrow(settings, io_threads, 16)[1], files, ctl),
             raw_save("s3fs", f"pipe_file x{n}, 16 MiB parts x8", B.w_s3fs_pipe(settings, 16, 8)[1], files, ctl)]
    if not quick:
        saves += [raw_save("pyarrow", f"open_output_stream x{n}, {p} MiB pieces",
                           B.w_arrow(settings, io_threads, p)[1], files, ctl) for p in (8, 32)]
        saves += [raw_save("s3fs", f"open/write x{n}, 50 MiB blocks (default)", B.w_s3fs_open(settings, 50)[1],
                           files, ctl),
                  raw_save("s3fs", f"pipe_file x{n}, 50 MiB parts x10 (default)",
                           B.w_s3fs_pipe(settings, 50, 10)[1], files, ctl)]

    src = f"{BUCKET}/raw-r/{uuid.uuid4().hex[:8]}"
    for name, data in files.items():
        ctl.pipe_file(f"{src}/{name}", bytes(data))
    afs = C.make_arrow_fs(settings)
    fs = B.fresh_s3fs(settings)
    whole = max(tensor_bytes, MiB)
    buffers = {n: memoryview(bytearray(len(b))) for n, b in files.items()}  # shared: one set in memory
    loads = [raw_load("pyarrow", f"readinto x{n}, tensor-sized ranges, 1 thread/object",
                      lambda p, out: B.arrow_ranges_into(afs, p, out, whole, 1), files, src, buffers),
             raw_load("pyarrow", f"readinto x{n}, 16 MiB ranges, 4 threads/object",
                      lambda p, out: B.arrow_ranges_into(afs, p, out, 16 * MiB, 4), files, src, buffers),
             raw_load("s3fs", f"cat_file x{n}, 16 MiB ranges, 4 threads/object",
                      lambda p, out: B.s3fs_ranges_into(fs, p, out, 16 * MiB, 4), files, src, buffers)]
    if not quick:
        loads += [raw_load("pyarrow", f"readinto x{n}, 8 MiB ranges, 8 threads/object",
                           lambda p, out: B.arrow_ranges_into(afs, p, out, 8 * MiB, 8), files, src, buffers),
                  raw_load("s3fs", f"cat_file x{n}, whole object",
                           lambda p, out: B.s3fs_ranges_into(fs, p, out, len(out), 1), files, src, buffers)]
    return saves + loads


# ------------------------------------------------------------------------------------ request count

def count_requests(info, settings, options: dict, state: dict[str, torch.Tensor], thread_count: int,
                   files: Files) -> dict[str, int]:
    """Requests per load, counted by a proxy (tests/support/fault_proxy.py, faults off) between the
    client and the server: one dcp_forge load (Arrow, checksums verified) of a checkpoint, and the best
    raw reader (pyarrow ``readinto``, 16 MiB ranges, 4 threads per object) of that checkpoint's data
    objects, the same bytes. Untimed: the proxy relays every byte in Python."""
    import dataclasses

    from tests.support.fault_proxy import FaultProxy

    with FaultProxy(info.endpoint_url) as proxy:
        proxied = {**options, "endpoint_url": proxy.endpoint_url, "data_client": "arrow"}
        coordinator = CheckpointCoordinator(
            [StateComponent("model", _TensorDict(state), SharingPattern.REPLICATED)],
            output_dir=f"s3://{BUCKET}/counted", storage_options=proxied, thread_count=thread_count)
        path = coordinator.save_checkpoint(checkpoint_id="c")
        target = {k: torch.empty_like(v) for k, v in state.items()}
        loader = CheckpointCoordinator([StateComponent("model", _TensorDict(target), SharingPattern.REPLICATED)],
                                       output_dir=f"s3://{BUCKET}/counted", storage_options=proxied,
                                       thread_count=thread_count)
        proxy.reset_stats()
        loader.load_checkpoint(path)
        forge = proxy.stats()["requests"]
        if any(not torch.equal(target[k], v) for k, v in state.items()):
            raise AssertionError("the counted dcp_forge load read different values")
        afs = C.make_arrow_fs(dataclasses.replace(settings, endpoint_url=proxy.endpoint_url))
        native = path.split("://", 1)[1]
        proxy.reset_stats()
        per_object(lambda p, data: B.arrow_ranges_into(afs, p, memoryview(bytearray(len(data))), 16 * MiB, 4),
                   files)(native)
        raw = proxy.stats()["requests"]
    return {"dcp_forge": forge, "raw": raw}


# ------------------------------------------------------------------------------------------ driver

def measure(contenders: list[Contender], repeats: int, clock: B.Clock, log: Callable[[str], None]) -> None:
    for rep in range(repeats):
        k = rep % len(contenders)
        for c in contenders[k:] + contenders[:k]:
            clock.start()
            c.run(rep)
            c.samples.append(clock.stop())
            c.after(rep)
        log(f"  round {rep + 1}/{repeats} done")


def summarize(contenders: list[Contender], nbytes: int) -> dict:
    rows = []
    for c in contenders:
        rates = [nbytes / s[0] / 1e6 for s in c.samples]
        rows.append(dict(op=c.op, kind=c.kind, name=c.name, mb_s=round(statistics.median(rates), 1),
                         best=round(max(rates), 1), worst=round(min(rates), 1),
                         client_cpu_s_per_gb=round(statistics.median(s[1] for s in c.samples) / (nbytes / 1e9), 2),
                         server_cpu_s_per_gb=round(statistics.median(s[2] for s in c.samples) / (nbytes / 1e9), 2)))
    ratios = {}
    for op in ("save", "load"):
        raw = [r for r in rows if r["op"] == op and r["kind"] != "dcp_forge"]
        best_med = max(raw, key=lambda r: r["mb_s"])
        best_best = max(r["best"] for r in raw)
        for r in rows:
            if r["op"] == op and r["kind"] == "dcp_forge":
                r["ratio_median"] = round(r["mb_s"] / best_med["mb_s"], 3)
                r["ratio_best"] = round(r["best"] / best_best, 3)
        ratios[op] = {"best_raw": f"{best_med['kind']} {best_med['name']}", "best_raw_mb_s": best_med["mb_s"],
                      **{r["name"]: r["ratio_median"] for r in rows if r["op"] == op and r["kind"] == "dcp_forge"}}
    return {"rows": rows, "ratios": ratios}


def print_table(summary: dict, args, nbytes: int, conditions: str) -> None:
    print(f"\nS3 checkpoint throughput: {nbytes / 1e6:.0f} MB of data objects ({args.tensors} float32 tensors), "
          f"median (best) of {args.repeats} rounds, MB/s\n")
    print("| op | client | what | MB/s median | best | forge / best raw (median; best) | client CPU s/GB "
          "| server CPU s/GB |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for r in summary["rows"]:
        ratio = f"{r['ratio_median']:.2f}x; {r['ratio_best']:.2f}x" if "ratio_median" in r else ""
        print(f"| {r['op']} | {r['kind']} | {r['name']} | {r['mb_s']:.1f} | {r['best']:.1f} | {ratio} | "
              f"{r['client_cpu_s_per_gb']:.2f} | {r['server_cpu_s_per_gb']:.2f} |")
    for op, rat in summary["ratios"].items():
        print(f"\n{op}: best raw = {rat['best_raw']} ({rat['best_raw_mb_s']} MB/s)")
    print(f"\n{conditions}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size-mib", type=int, default=512)
    p.add_argument("--tensors", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--thread-count", type=int, default=2,
                   help="dcp_forge thread_count (files per rank, reader threads); the raw clients move the "
                        "objects a save with this thread_count writes (default 2, the coordinator's default)")
    p.add_argument("--extra-thread-counts", default="",
                   help="comma-separated further thread_counts to measure dcp_forge (Arrow) with, e.g. 4")
    p.add_argument("--quick", action="store_true", help="fewer raw variants (128 MiB unless --size-mib is given)")
    p.add_argument("--data-dir", help="the server's data dir (default: under the temp dir, local disk)")
    p.add_argument("--gomemlimit", default="1GiB")
    p.add_argument("--json", help="also write the results here")
    a = p.parse_args(argv)
    if a.quick and "--size-mib" not in (argv or sys.argv[1:]):
        a.size_mib = 128
    # One process without torch.distributed is the case measured here; DCP says so on every call.
    warnings.filterwarnings("ignore", message="torch.distributed is disabled")
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    state = make_state(SaveLoadConfig(size_mib=a.size_mib, tensors=a.tensors, repetitions=1))
    target = {k: torch.empty_like(v) for k, v in state.items()}
    with s3_server.running_server("seaweedfs", buckets=[BUCKET], gomemlimit=a.gomemlimit,
                                  data_dir=a.data_dir) as info:
        settings = C.S3Settings.from_server(info)
        options = C.s3fs_kwargs(settings)
        ctl = B.fresh_s3fs(settings)
        files = {n: memoryview(b) for n, b in forge_data_files(ctl, options, state, a.thread_count).items()}
        nbytes = sum(len(b) for b in files.values())
        log(f"data objects per save: {', '.join(f'{n} ({len(b) / MiB:.1f} MiB)' for n, b in files.items())}")
        contenders = [c for client in ("arrow", "s3fs")
                      for c in forge_contenders(options, client, state, target, a.thread_count, ctl)]
        for count in [int(x) for x in a.extra_thread_counts.split(",") if x.strip()]:
            contenders += forge_contenders(options, "arrow", state, target, count, ctl)
        contenders += raw_contenders(settings, files, ctl, a.size_mib * MiB // a.tensors, a.quick)
        requests = count_requests(info, settings, options, state, a.thread_count, files)
        log(f"requests per load: dcp_forge {requests['dcp_forge']}, raw pyarrow {requests['raw']}")
        clock = B.Clock(info.pid)
        load0 = os.getloadavg()[0]
        for op in ("save", "load"):
            measure([c for c in contenders if c.op == op], a.repeats, clock, log)
        load1 = os.getloadavg()[0]
        data_dir = info.data_dir
    import pyarrow as pa

    summary = summarize(contenders, nbytes)
    conditions = (f"SeaweedFS `weed mini` on 127.0.0.1, data in {data_dir} (local disk), GOMEMLIMIT={a.gomemlimit}; "
                  f"{os.cpu_count()} CPUs shared by client, server and other work (load average {load0:.1f} before, "
                  f"{load1:.1f} after); pyarrow {pa.__version__} io_thread_count={pa.io_thread_count()}")
    summary["requests_per_load"] = requests
    print_table(summary, a, nbytes, conditions)
    print(f"\nrequests per load (counted at a proxy): dcp_forge {requests['dcp_forge']}, raw pyarrow readinto 16 MiB "
          f"ranges x4 threads/object {requests['raw']} ({requests['dcp_forge'] / requests['raw']:.2f}x)")
    if a.json:
        Path(a.json).write_text(json.dumps({"bytes": nbytes, "size_mib": a.size_mib, "tensors": a.tensors,
                                            "repeats": a.repeats, "thread_count": a.thread_count,
                                            "conditions": conditions, **summary}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
