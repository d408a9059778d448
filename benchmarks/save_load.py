"""Save and load a state of N GiB on one rank: dcp_forge against DCP, torch.save and the disk's limits.

Every repetition measures, back to back and with the same tensors:

- saves: the durable-write limit (2 streams of os.write + fsync), dcp_forge (CheckpointCoordinator),
  DCP ``FileSystemWriter`` with its defaults and with ``thread_count=2``, and ``torch.save`` + fsync;
- loads into preallocated tensors, each from a cold page cache: the cold-read limit, dcp_forge,
  DCP ``FileSystemReader`` and ``torch.load`` + copy.

The order of the contenders rotates between repetitions, so none always runs right after the disk
has been busiest, and every contender run is paired with a limit measurement next to it. Ratios are
taken within a pair and reported as the median over repetitions. Every load is checked against the
saved values.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter

from benchmarks.disk import (
    cold_read_limit,
    drop_page_cache,
    durable_write_limit,
    recycle_page_cache,
    resident_bytes,
)
from benchmarks.results import write_json
from dcp_forge.coordinator import CheckpointCoordinator
from dcp_forge.core.components import StateComponent
from dcp_forge.core.patterns import SharingPattern

LIMIT = "disk limit"


@dataclasses.dataclass(frozen=True)
class SaveLoadConfig:
    """What to save: ``tensors`` float32 tensors of ``rows x 1024`` summing to ``size_mib`` MiB."""

    size_mib: int = 1024
    tensors: int = 16
    repetitions: int = 5
    directory: str | None = None  # default: a temporary directory on the default temp filesystem

    def __post_init__(self) -> None:
        for name in ("size_mib", "tensors", "repetitions"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name!r} must be a positive int (got {value!r})")
        if self.size_mib * 256 % self.tensors:
            raise ValueError(f"'size_mib' ({self.size_mib}) must split into {self.tensors} tensors of whole "
                             "4 KiB rows")

    @property
    def nbytes(self) -> int:
        return self.size_mib * 1024 * 1024


class _TensorDict:
    """A Stateful over a dict of tensors that loads in place (DCP fills the tensors it hands out)."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self.tensors = dict(tensors)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.tensors

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        for key, value in state.items():
            if value.data_ptr() != self.tensors[key].data_ptr():
                self.tensors[key].copy_(value)


def make_state(config: SaveLoadConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    rows = config.nbytes // config.tensors // 4096
    gen = torch.Generator().manual_seed(seed)
    return {f"layer{i:03d}.weight": torch.randn(rows, 1024, generator=gen) for i in range(config.tensors)}


def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- contenders: each takes (directory, state) and returns nothing; timing is done by the caller --------
def _forge_save(path: str, state: dict[str, torch.Tensor]) -> None:
    coord = CheckpointCoordinator([StateComponent("model", _TensorDict(state), SharingPattern.REPLICATED)],
                                  output_dir=os.path.dirname(path))
    coord.save_checkpoint(checkpoint_path=path)


def _forge_load(path: str, state: dict[str, torch.Tensor]) -> None:
    coord = CheckpointCoordinator([StateComponent("model", _TensorDict(state), SharingPattern.REPLICATED)],
                                  output_dir=os.path.dirname(path))
    coord.load_checkpoint(path)


def _dcp_save(thread_count: int) -> Callable[[str, dict[str, torch.Tensor]], None]:
    def save(path: str, state: dict[str, torch.Tensor]) -> None:
        dcp.save({"model": state}, storage_writer=FileSystemWriter(path, thread_count=thread_count), no_dist=True)
    return save


def _dcp_load(path: str, state: dict[str, torch.Tensor]) -> None:
    dcp.load({"model": state}, storage_reader=FileSystemReader(path), no_dist=True)


def _torch_save(path: str, state: dict[str, torch.Tensor]) -> None:
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "state.pt"), "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    _fsync_path(path)


def _torch_load(path: str, state: dict[str, torch.Tensor]) -> None:
    loaded = torch.load(os.path.join(path, "state.pt"), map_location="cpu", weights_only=True)
    for key, value in loaded.items():
        state[key].copy_(value)


_SAVERS: dict[str, Callable[[str, dict[str, torch.Tensor]], None]] = {
    "dcp_forge": _forge_save,
    "dcp defaults": _dcp_save(1),
    "dcp thread_count=2": _dcp_save(2),
    "torch.save": _torch_save,
}
# Which saved checkpoint each loader reads (DCP's reader has no options that change its speed).
_LOADERS: dict[str, tuple[str, Callable[[str, dict[str, torch.Tensor]], None]]] = {
    "dcp_forge": ("dcp_forge", _forge_load),
    "dcp defaults": ("dcp thread_count=2", _dcp_load),
    "torch.load": ("torch.save", _torch_load),
}


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name)


def _rotated(names: Sequence[str], rep: int) -> list[str]:
    k = rep % len(names)
    return list(names[k:]) + list(names[:k])


@dataclasses.dataclass
class SaveLoadResult:
    """Seconds per contender and, for each of its runs, the disk limit measured right next to it."""

    config: SaveLoadConfig
    save_seconds: dict[str, list[float]]
    save_limit_seconds: dict[str, list[float]]
    load_seconds: dict[str, list[float]]
    load_limit_seconds: dict[str, list[float]]
    # 1-minute load average before and after: other work on the machine distorts every number
    load_average: list[float] = dataclasses.field(default_factory=list)
    # [user, system] CPU seconds (all threads) per run, keyed "save:<name>" / "load:<name>". User time
    # is the software's own cost; system time is mostly the kernel copying pages and, on a busy
    # machine, reclaiming memory, so it varies from run to run for the same work.
    cpu_seconds: dict[str, list[list[float]]] = dataclasses.field(default_factory=dict)
    # Fraction of each load's files still in the page cache right after eviction (0.0: a cold read)
    resident_after_eviction: list[float] = dataclasses.field(default_factory=list)

    def _summary(self, phase: str, seconds: dict[str, list[float]], limits: dict[str, list[float]]
                 ) -> dict[str, dict]:
        gib = self.config.nbytes / 2**30

        def cpu_per_gib(name: str) -> dict[str, float] | None:
            runs = self.cpu_seconds.get(f"{phase}:{name}")
            if not runs:
                return None
            return {"user": statistics.median(r[0] for r in runs) / gib,
                    "system": statistics.median(r[1] for r in runs) / gib}

        pooled = [t for times in limits.values() for t in times]
        out = {LIMIT: {"gbps_median": self.config.nbytes / statistics.median(pooled) / 1e9, "seconds": pooled,
                       "ratio_to_limit_median": 1.0, "ratio_to_limit_min": 1.0, "ratio_to_limit_max": 1.0,
                       "cpu_seconds_per_gib": cpu_per_gib(LIMIT)}}
        for name, times in seconds.items():
            ratios = [limit / t for limit, t in zip(limits[name], times, strict=True)]
            out[name] = {"gbps_median": self.config.nbytes / statistics.median(times) / 1e9,
                         "seconds": times, "limit_seconds": limits[name],
                         "ratio_to_limit_median": statistics.median(ratios),
                         "ratio_to_limit_min": min(ratios), "ratio_to_limit_max": max(ratios),
                         "cpu_seconds_per_gib": cpu_per_gib(name)}
        return out

    def to_json(self) -> dict[str, Any]:
        save = self._summary("save", self.save_seconds, self.save_limit_seconds)
        load = self._summary("load", self.load_seconds, self.load_limit_seconds)
        return {"config": dataclasses.asdict(self.config), "bytes": self.config.nbytes,
                "load_average": self.load_average, "cpus": os.cpu_count(), "save": save, "load": load,
                "resident_after_eviction_max": max(self.resident_after_eviction, default=None),
                "vs_best_dcp": {"save": vs_best_dcp(save), "load": vs_best_dcp(load)}}


def vs_best_dcp(rows: Mapping[str, Mapping[str, Any]]) -> dict[str, Any] | None:
    """dcp_forge's median GB/s over that of the fastest DCP configuration (the issue-2 target: >= 1.0)."""
    dcp_rows = {name: row for name, row in rows.items() if name.startswith("dcp ")}
    if "dcp_forge" not in rows or not dcp_rows:
        return None
    best = max(dcp_rows, key=lambda name: dcp_rows[name]["gbps_median"])
    return {"best_dcp": best, "ratio": rows["dcp_forge"]["gbps_median"] / dcp_rows[best]["gbps_median"]}


def _cpu_seconds() -> tuple[float, float]:
    usage = resource.getrusage(resource.RUSAGE_SELF)  # every thread of this process
    return usage.ru_utime, usage.ru_stime


def _timed(fn: Callable[[], Any], cpu: list[list[float]] | None = None) -> float:
    """Wall seconds of ``fn()``; its [user, system] CPU seconds (all threads) are appended to ``cpu``."""
    cpu_started, started = _cpu_seconds(), time.perf_counter()
    fn()
    seconds = time.perf_counter() - started
    if cpu is not None:
        cpu.append([end - start for start, end in zip(cpu_started, _cpu_seconds(), strict=True)])
    return seconds


def _paired(limit: Callable[[], float], contender: Callable[[], float], limit_first: bool) -> tuple[float, float]:
    """(limit seconds, contender seconds), measured back to back in the given order."""
    if limit_first:
        return limit(), contender()
    seconds = contender()
    return limit(), seconds


class _Run:
    """One benchmark run: the source state, the preallocated destination, a scratch directory."""

    def __init__(self, config: SaveLoadConfig, root: str, cpu: dict[str, list[list[float]]],
                 resident: list[float]) -> None:
        self.config = config
        self.root = root
        self.cpu = cpu
        self.resident = resident
        self.source = make_state(config)
        self.target = {k: torch.zeros_like(v) for k, v in self.source.items()}

    def _cpu_list(self, key: str) -> list[list[float]]:
        return self.cpu.setdefault(key, [])

    def save_limit(self, rep_dir: str) -> float:
        path = os.path.join(rep_dir, "limit")
        shutil.rmtree(path, ignore_errors=True)
        recycle_page_cache(rep_dir, list(self.source.values()))
        return _timed(lambda: durable_write_limit(path, list(self.source.values())), self._cpu_list(f"save:{LIMIT}"))

    def save(self, name: str, rep_dir: str) -> float:
        recycle_page_cache(rep_dir, list(self.source.values()))
        return _timed(lambda: _SAVERS[name](os.path.join(rep_dir, _slug(name)), self.source),
                      self._cpu_list(f"save:{name}"))

    def read_limit(self, rep_dir: str) -> float:
        limit_dir = os.path.join(rep_dir, "limit")
        self._evict(limit_dir)
        seconds = _timed(lambda: cold_read_limit(limit_dir, list(self.target.values())), self._cpu_list(f"load:{LIMIT}"))
        self._zero_target()
        return seconds

    def load(self, name: str, rep_dir: str) -> float:
        saved_by, loader = _LOADERS[name]
        path = os.path.join(rep_dir, _slug(saved_by))
        self._evict(path)
        seconds = _timed(lambda: loader(path, self.target), self._cpu_list(f"load:{name}"))
        bad = [k for k in self.source if not torch.equal(self.source[k], self.target[k])]
        if bad:
            raise RuntimeError(f"{name} loaded wrong values for {bad[:3]}")
        self._zero_target()
        return seconds

    def _evict(self, path: str) -> None:
        """Drop ``path`` from the page cache and record how much of it stayed (should be nothing)."""
        size = drop_page_cache(path)
        resident = resident_bytes(path)
        if resident is not None and size:
            self.resident.append(resident / size)

    def _zero_target(self) -> None:
        for t in self.target.values():
            t.zero_()


def run_save_load(config: SaveLoadConfig, log: Callable[[str], None] = print) -> SaveLoadResult:
    """Run every repetition; returns the raw seconds. Needs about 3x ``size_mib`` of free memory.

    Each contender's run is paired with a measurement of the disk limit right before or right after
    it (alternating), and its ratio is taken against that one: on a disk whose speed drifts within
    seconds, the neighbouring measurement is the fair reference.
    """
    result = SaveLoadResult(config, {n: [] for n in _SAVERS}, {n: [] for n in _SAVERS},
                            {n: [] for n in _LOADERS}, {n: [] for n in _LOADERS})
    result.load_average.append(os.getloadavg()[0])
    root = tempfile.mkdtemp(prefix="forge-bench-", dir=config.directory)
    gb = config.nbytes / 1e9
    try:
        run = _Run(config, root, result.cpu_seconds, result.resident_after_eviction)
        for rep in range(config.repetitions):
            rep_dir = os.path.join(root, f"rep{rep}")
            os.makedirs(rep_dir)
            for i, name in enumerate(_rotated(list(_SAVERS), rep)):
                limit, seconds = _paired(lambda: run.save_limit(rep_dir), lambda: run.save(name, rep_dir),  # noqa: B023
                                         limit_first=(rep + i) % 2 == 0)
                result.save_seconds[name].append(seconds)
                result.save_limit_seconds[name].append(limit)
                log(f"rep {rep} save {name:<20} {gb / seconds:6.2f} GB/s   limit {gb / limit:6.2f} GB/s   "
                    f"ratio {limit / seconds:5.2f}")
            for i, name in enumerate(_rotated(list(_LOADERS), rep)):
                limit, seconds = _paired(lambda: run.read_limit(rep_dir), lambda: run.load(name, rep_dir),  # noqa: B023
                                         limit_first=(rep + i) % 2 == 0)
                result.load_seconds[name].append(seconds)
                result.load_limit_seconds[name].append(limit)
                log(f"rep {rep} load {name:<20} {gb / seconds:6.2f} GB/s   limit {gb / limit:6.2f} GB/s   "
                    f"ratio {limit / seconds:5.2f}")
            shutil.rmtree(rep_dir)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    result.load_average.append(os.getloadavg()[0])
    return result


def format_table(result: dict[str, Any]) -> str:
    """A markdown table of a ``SaveLoadResult.to_json()`` (as printed and pasted into docs/PERFORMANCE.md)."""
    gib = result["bytes"] / 2**30
    load = "/".join(f"{x:.1f}" for x in result.get("load_average", []))
    resident = result.get("resident_after_eviction_max")
    cold = "" if resident is None else f"; at most {resident:.1%} of a load's files cached when it started"
    lines = [f"| {gib:g} GiB, one rank (load average {load} on {result.get('cpus')} CPUs{cold}) | GB/s (median) | "
             "× disk limit (median, min–max) | × DCP's best | CPU s/GiB user + system |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for phase in ("save", "load"):
        for name, row in result[phase].items():
            label = f"{phase}: {name}" if name != LIMIT else f"{phase}: {'durable write' if phase == 'save' else 'cold read'} limit"
            cpu = row.get("cpu_seconds_per_gib")
            cpu_text = "-" if cpu is None else f"{cpu['user']:.2f} + {cpu['system']:.2f}"
            best = result.get("vs_best_dcp", {}).get(phase) if name == "dcp_forge" else None
            best_text = "-" if best is None else f"{best['ratio']:.2f} ({best['best_dcp']})"
            lines.append(f"| {label} | {row['gbps_median']:.2f} | {row['ratio_to_limit_median']:.2f} "
                         f"({row['ratio_to_limit_min']:.2f}–{row['ratio_to_limit_max']:.2f}) | {best_text} | "
                         f"{cpu_text} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Save and load a 1 GiB state on one rank: dcp_forge vs DCP defaults / thread_count=2 / torch.save and the disk's durable-write and cold-read limits, measured in the same run.")
    parser.add_argument("--size-mib", type=int, default=1024, help="state size in MiB (default 1024)")
    parser.add_argument("--tensors", type=int, default=16, help="number of equal float32 tensors (default 16)")
    parser.add_argument("--repetitions", type=int, default=5, help="repetitions; medians are reported (default 5)")
    parser.add_argument("--dir", default=None, help="directory on the disk to measure (default: the temp dir)")
    parser.add_argument("--json", default=None, help="also write the results as JSON to this file")
    args = parser.parse_args(argv)
    config = SaveLoadConfig(size_mib=args.size_mib, tensors=args.tensors, repetitions=args.repetitions,
                            directory=args.dir)
    result = run_save_load(config).to_json()
    print(format_table(result))
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
