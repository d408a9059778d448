"""Raw S3 client throughput: s3fs vs pyarrow, writing and reading one large object.

Starts a local SeaweedFS with ``tests/support/s3_server.py`` (or uses ``--state-dir`` of a running one),
then times each (client, method, settings) on a fresh key, median of ``--repeats`` runs, and
prints a table in MB/s (1 MB = 10^6 bytes). Data is random (incompressible) and checked after
each read variant's first run, outside the timing.

    python -m benchmarks.s3_clients [--size-mib 256] [--repeats 3] [--quick] [--json out.json]
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import hashlib
import json
import os
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from tests.support import s3_clients as C
from tests.support import s3_server

MiB = 2**20
BUCKET = "bench"


def fresh_s3fs(settings, **kw):
    """An s3fs client of its own (no instance or listings cache shared with other variants)."""
    return C.make_s3fs(settings, skip_instance_cache=True, use_listings_cache=False, **kw)


# --------------------------------------------------------------------------------------- writes

def w_s3fs_open(settings, block_mib: int, piece_mib: int = 8, **fskw):
    fs = fresh_s3fs(settings, **fskw)

    def run(path: str, data: memoryview):
        # s3fs uploads the parts of an open() file one after another ("TODO: concurrent here" in
        # s3fs 2026.9); writing in pieces keeps each part near block_size.
        with fs.open(path, "wb", block_size=block_mib * MiB) as f:
            for off in range(0, len(data), piece_mib * MiB):
                f.write(data[off:off + piece_mib * MiB])
    return fs, run


def w_s3fs_pipe(settings, chunk_mib: int, concurrency: int, **fskw):
    fs = fresh_s3fs(settings, **fskw)

    def run(path: str, data: memoryview):
        # botocore refuses a memoryview Body; s3fs slices the bytes into parts (a copy per part).
        fs.pipe_file(path, data.obj, chunksize=chunk_mib * MiB, max_concurrency=concurrency)
    return fs, run


def w_arrow(settings, threads: int, piece_mib: int = 8):
    import pyarrow as pa

    afs = C.make_arrow_fs(settings)

    def run(path: str, data: memoryview):
        pa.set_io_thread_count(threads)
        with afs.open_output_stream(path) as f:
            for off in range(0, len(data), piece_mib * MiB):
                f.write(data[off:off + piece_mib * MiB])
    return afs, run


# ---------------------------------------------------------------------------------------- reads

def r_s3fs_cat(settings, block_mib: int, concurrency: int):
    fs = fresh_s3fs(settings, default_block_size=block_mib * MiB, max_concurrency=concurrency)
    return lambda path, size: fs.cat_file(path)


def r_s3fs_ranges(settings, chunk_mib: int, threads: int):
    """Ranged cat_file calls from a thread pool, each landing in its slice of one buffer."""
    fs = fresh_s3fs(settings)

    def run(path, size):
        out = bytearray(size)
        s3fs_ranges_into(fs, path, memoryview(out), chunk_mib * MiB, threads)
        return out
    return run


def s3fs_ranges_into(fs, path: str, out: memoryview, chunk: int, threads: int, start: int = 0) -> None:
    """Fill ``out`` with bytes ``[start, start + len(out))`` of ``path``: ranged ``cat_file`` calls of
    ``chunk`` bytes from ``threads`` threads, each copied into its slice (s3fs cannot read into memory)."""
    size = len(out)

    def one(off):
        end = min(size, off + chunk)
        out[off:end] = fs.cat_file(path, start=start + off, end=start + end)
    with cf.ThreadPoolExecutor(threads) as ex:
        list(ex.map(one, range(0, size, chunk)))


def r_arrow_read(settings, threads: int):
    import pyarrow as pa

    afs = C.make_arrow_fs(settings)

    def run(path, size):
        pa.set_io_thread_count(threads)
        with afs.open_input_file(path) as f:
            return f.read()
    return run


def r_arrow_readinto(settings, chunk_mib: int, threads: int):
    """One input file per thread, ``readinto`` the destination slice: no intermediate bytes."""
    afs = C.make_arrow_fs(settings)

    def run(path, size):
        out = bytearray(size)
        arrow_ranges_into(afs, path, memoryview(out), chunk_mib * MiB, threads)
        return out
    return run


def arrow_ranges_into(afs, path: str, out: memoryview, chunk: int, threads: int, start: int = 0) -> None:
    """Fill ``out`` with bytes ``[start, start + len(out))`` of ``path``: ``threads`` threads, one
    input file each, ``readinto`` ``chunk``-byte slices straight into ``out`` (no intermediate bytes)."""
    size = len(out)
    offs = list(range(0, size, chunk))
    threads = max(1, min(threads, len(offs)))

    def worker(my_offs):
        with afs.open_input_file(path) as f:
            for off in my_offs:
                C.readinto_arrow(f, start + off, out[off:min(size, off + chunk)])
    with cf.ThreadPoolExecutor(threads) as ex:
        list(ex.map(worker, [offs[i::threads] for i in range(threads)]))


def r_arrow_read_at(settings, chunk_mib: int, threads: int):
    """One shared input file, ``read_at`` from a thread pool (thread-safe in Arrow), copied in place."""
    afs = C.make_arrow_fs(settings)

    def run(path, size):
        out = bytearray(size)
        mv = memoryview(out)
        with afs.open_input_file(path) as f:
            def one(off):
                n = min(chunk_mib * MiB, size - off)
                mv[off:off + n] = f.read_at(n, off)
            with cf.ThreadPoolExecutor(threads) as ex:
                list(ex.map(one, range(0, size, chunk_mib * MiB)))
        return out
    return run


# ---------------------------------------------------------------------------------------- driver

def _median_rate(times: list[float], nbytes: int) -> tuple[float, float, float]:
    rates = [nbytes / t / 1e6 for t in times]
    return statistics.median(rates), min(rates), max(rates)


class Clock:
    """Wall time plus CPU seconds of this process (all threads) and of the server process.

    On a small shared machine CPU-seconds per GB is the steadier number: wall-clock MB/s falls
    with whatever else runs, the CPU cost of moving a byte does not (much)."""

    def __init__(self, server_pid: int | None):
        self.pid = server_pid
        self.tick = os.sysconf("SC_CLK_TCK")

    def _server_cpu(self) -> float:
        if self.pid is None:
            return 0.0
        try:
            f = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(f[11]) + int(f[12])) / self.tick  # utime + stime
        except OSError:
            return 0.0

    def start(self):
        self._t = (time.perf_counter(), time.process_time(), self._server_cpu())

    def stop(self) -> tuple[float, float, float]:
        w, c, s = self._t
        return time.perf_counter() - w, time.process_time() - c, self._server_cpu() - s


def _row(op, client, method, setting, samples, size) -> dict:
    med, lo, hi = _median_rate([t[0] for t in samples], size)
    gb = size / 1e9
    return dict(op=op, client=client, method=method, settings=setting, mb_s=round(med, 1),
                min=round(lo, 1), max=round(hi, 1),
                client_cpu_s_per_gb=round(statistics.median(t[1] for t in samples) / gb, 2),
                server_cpu_s_per_gb=round(statistics.median(t[2] for t in samples) / gb, 2))


def bench(settings, size: int, repeats: int, quick: bool, server_pid: int | None = None) -> list[dict]:
    clock = Clock(server_pid)
    data = os.urandom(size)
    digest = hashlib.sha256(data).hexdigest()
    mv = memoryview(data)
    ctl = fresh_s3fs(settings)
    results = []
    nochk = {"config_kwargs": {**C.s3fs_kwargs(settings)["config_kwargs"],
                               "request_checksum_calculation": "when_required",
                               "response_checksum_validation": "when_required"}}

    writers: list[tuple[str, str, str, Callable]] = [
        ("s3fs", "open/write", "block 50 MiB (default)", lambda: w_s3fs_open(settings, 50)),
        ("s3fs", "open/write", "block 16 MiB", lambda: w_s3fs_open(settings, 16)),
        ("s3fs", "pipe_file", "chunk 50 MiB x10 (default)", lambda: w_s3fs_pipe(settings, 50, 10)),
        ("s3fs", "pipe_file", "chunk 16 MiB x4", lambda: w_s3fs_pipe(settings, 16, 4)),
        ("s3fs", "pipe_file", "chunk 16 MiB x16", lambda: w_s3fs_pipe(settings, 16, 16)),
        ("s3fs", "pipe_file", "chunk 8 MiB x8", lambda: w_s3fs_pipe(settings, 8, 8)),
        ("s3fs", "pipe_file", "chunk 16 MiB x16, no CRC", lambda: w_s3fs_pipe(settings, 16, 16, **nochk)),
        ("s3fs", "open/write", "block 50 MiB, no CRC", lambda: w_s3fs_open(settings, 50, **nochk)),
        ("pyarrow", "open_output_stream", "io_threads 8 (default)", lambda: w_arrow(settings, 8)),
        ("pyarrow", "open_output_stream", "io_threads 4", lambda: w_arrow(settings, 4)),
        ("pyarrow", "open_output_stream", "io_threads 16", lambda: w_arrow(settings, 16)),
        ("pyarrow", "open_output_stream", "io_threads 32", lambda: w_arrow(settings, 32)),
    ]
    if quick:
        writers = [w for w in writers if "default" in w[2]]
    # Repeats go round-robin over the variants, so load from anything else on the machine
    # spreads over all of them instead of sinking whichever variant ran at that moment.
    runs = [(spec, spec[3]()[1]) for spec in writers]
    wtimes: dict[int, list[tuple[float, float, float]]] = {i: [] for i in range(len(runs))}
    for _ in range(repeats):
        for i, (_, run) in enumerate(runs):
            path = f"{BUCKET}/w/{uuid.uuid4().hex}"
            clock.start()
            run(path, mv)
            wtimes[i].append(clock.stop())
            ctl.rm(path)
    for i, ((client, method, setting, _), _) in enumerate(runs):
        results.append(_row("write", client, method, setting, wtimes[i], size))
        print(f"  write {client:8s} {method:20s} {setting:30s} {results[-1]['mb_s']:7.1f} MB/s",
              file=sys.stderr)

    src = f"{BUCKET}/r/{uuid.uuid4().hex}"
    ctl.pipe_file(src, data)
    readers: list[tuple[str, str, str, Callable]] = [
        ("s3fs", "cat_file", "block 50 MiB x10 (default)", lambda: r_s3fs_cat(settings, 50, 10)),
        ("s3fs", "cat_file", "block 16 MiB x8", lambda: r_s3fs_cat(settings, 16, 8)),
        ("s3fs", "cat_file", "block 8 MiB x16", lambda: r_s3fs_cat(settings, 8, 16)),
        ("s3fs", "ranged cat_file", "16 MiB ranges, 8 threads", lambda: r_s3fs_ranges(settings, 16, 8)),
        ("pyarrow", "read()", "io_threads 8 (default)", lambda: r_arrow_read(settings, 8)),
        ("pyarrow", "read_at", "16 MiB ranges, 4 threads", lambda: r_arrow_read_at(settings, 16, 4)),
        ("pyarrow", "read_at", "16 MiB ranges, 8 threads", lambda: r_arrow_read_at(settings, 16, 8)),
        ("pyarrow", "read_at", "8 MiB ranges, 16 threads", lambda: r_arrow_read_at(settings, 8, 16)),
        ("pyarrow", "readinto", "16 MiB ranges, 8 threads", lambda: r_arrow_readinto(settings, 16, 8)),
    ]
    if quick:
        readers = [r for r in readers if "default" in r[2]]
    rruns = [(spec, spec[3]()) for spec in readers]
    rtimes: dict[int, list[tuple[float, float, float]]] = {i: [] for i in range(len(rruns))}
    for rep in range(repeats):
        for i, ((client, method, setting, _), run) in enumerate(rruns):
            clock.start()
            out = run(src, size)
            rtimes[i].append(clock.stop())
            if rep == 0 and hashlib.sha256(out).hexdigest() != digest:
                raise AssertionError(f"{client} {method} {setting}: read back different bytes")
            del out
    for i, ((client, method, setting, _), _) in enumerate(rruns):
        results.append(_row("read", client, method, setting, rtimes[i], size))
        print(f"  read  {client:8s} {method:20s} {setting:30s} {results[-1]['mb_s']:7.1f} MB/s",
              file=sys.stderr)
    ctl.rm(src)
    return results


def print_table(results: list[dict], size: int, repeats: int) -> None:
    print(f"\nS3 client throughput, {size // MiB} MiB object, median of {repeats} (min-max), MB/s\n")
    print("| op    | client  | method             | settings                       |   MB/s | min-max   "
          "| client CPU s/GB | server CPU s/GB |")
    print("|-------|---------|--------------------|--------------------------------|-------:|-----------"
          "|----------------:|----------------:|")
    for r in results:
        span = f"{r['min']:.0f}-{r['max']:.0f}"
        print(f"| {r['op']:5s} | {r['client']:7s} | {r['method']:18s} | {r['settings']:30s} | "
              f"{r['mb_s']:6.1f} | {span:9s} | {r['client_cpu_s_per_gb']:15.2f} | "
              f"{r['server_cpu_s_per_gb']:15.2f} |")
    for op in ("write", "read"):
        best = max((r for r in results if r["op"] == op), key=lambda r: r["mb_s"])
        print(f"\nfastest {op}: {best['client']} {best['method']} [{best['settings']}] {best['mb_s']} MB/s")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size-mib", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="default settings only")
    p.add_argument("--state-dir", help="use the server of this state dir instead of starting one")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--gomemlimit", default="512MiB", help="GOMEMLIMIT of the started server")
    p.add_argument("--data-dir", help="data dir of the started server (e.g. under /dev/shm to take "
                                      "the disk out of the measurement)")
    p.add_argument("--server-arg", action="append", default=[],
                   help="extra 'weed mini' flag for the started server, e.g. -filer.maxMB=16")
    a = p.parse_args(argv)
    size = a.size_mib * MiB
    with contextlib.ExitStack() as stack:
        if a.state_dir:
            info = s3_server.read_state(a.state_dir)
        else:
            info = stack.enter_context(s3_server.running_server(
                "seaweedfs", buckets=[BUCKET], gomemlimit=a.gomemlimit, extra_args=a.server_arg,
                data_dir=a.data_dir))
        settings = C.S3Settings.from_server(info)
        with contextlib.suppress(FileExistsError):
            fresh_s3fs(settings).mkdir(BUCKET)
        load0 = os.getloadavg()[0]
        results = bench(settings, size, a.repeats, a.quick, server_pid=None if a.state_dir else info.pid)
        load1 = os.getloadavg()[0]
    print_table(results, size, a.repeats)
    print(f"server: {info.backend}, GOMEMLIMIT={a.gomemlimit}, extra args {a.server_arg or 'none'}, "
          f"data in {info.data_dir}; "
          f"{os.cpu_count()} CPUs shared by client and server; load average {load0:.1f} before, "
          f"{load1:.1f} after (above ~3 means other work competed for the CPUs: rerun)")
    if a.json:
        Path(a.json).write_text(json.dumps({"size_bytes": size, "repeats": a.repeats,
                                            "load_before": load0, "load_after": load1,
                                            "gomemlimit": a.gomemlimit, "server_args": a.server_arg,
                                            "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
