"""``dcp-forge bench``: the whole benchmark suite, a JSON report and a PNG plot.

Runs, in this order: save/load of a state against the disk's limits (save_load.py), save planning
at 8 to 4,096 simulated ranks x 1,000 items (planning.py), and inspect/diff of a synthetic
million-item index (index_scale.py). The plot shows save and load throughput of every contender
next to the limits measured in the same run (matplotlib, the ``bench`` extra).
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import time
from collections.abc import Callable
from typing import Any

from benchmarks.index_scale import format_index_scale, run_index_scale
from benchmarks.planning import format_planning, run_planning
from benchmarks.save_load import LIMIT, SaveLoadConfig, format_table, run_save_load


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    out_dir: str = "bench-report"
    size_mib: int = 1024
    repetitions: int = 5
    directory: str | None = None
    index_items: int = 1_000_000
    plot: bool = True
    quick: bool = False  # small sizes: a smoke run, not a measurement

    def __post_init__(self) -> None:
        for name in ("size_mib", "repetitions", "index_items"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name!r} must be a positive int (got {value!r})")

    def effective(self) -> BenchConfig:
        if not self.quick:
            return self
        return dataclasses.replace(self, size_mib=min(self.size_mib, 64), repetitions=min(self.repetitions, 2),
                                   index_items=min(self.index_items, 100_000), quick=False)


@dataclasses.dataclass(frozen=True)
class BenchReport:
    data: dict[str, Any]
    text: str
    json_path: str
    png_path: str | None


def _require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError as err:
        raise ImportError("the PNG plot needs matplotlib: pip install 'dcp-forge[bench]' (or pass --no-plot)") from err


def plot_save_load(result: dict[str, Any], path: str) -> None:
    """Horizontal bars: GB/s (median) of each contender, save and load, limits hatched."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), constrained_layout=True)
    for ax, phase, title in ((axes[0], "save", "save (durable)"), (axes[1], "load", "load (cold cache)")):
        rows = result[phase]
        names = list(rows)
        speeds = [rows[n]["gbps_median"] for n in names]
        labels = [("durable-write limit" if phase == "save" else "cold-read limit") if n == LIMIT else
                  f"{n}  ({rows[n]['ratio_to_limit_median']:.2f}x)" for n in names]
        colors = ["#bbbbbb" if n == LIMIT else ("#1f77b4" if n == "dcp_forge" else "#ff7f0e") for n in names]
        bars = ax.barh(labels[::-1], speeds[::-1], color=colors[::-1])
        for bar, n in zip(bars, names[::-1], strict=True):
            if n == LIMIT:
                bar.set_hatch("//")
        ax.set_xlabel("GB/s (median over repetitions)")
        ax.set_title(f"{title}, {result['bytes'] / 2**30:g} GiB on one rank")
    fig.suptitle("dcp_forge vs DCP / torch and the disk limits measured in the same run "
                 "(ratio: median of paired runs)", fontsize=9)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_suite(config: BenchConfig, log: Callable[[str], None] = print, progress: bool = False) -> BenchReport:
    """Run everything in ``config``; write ``bench.json`` (and ``bench.png``) to ``config.out_dir``."""
    if config.plot:
        _require_matplotlib()
    run = config.effective()
    os.makedirs(run.out_dir, exist_ok=True)
    steps = ["save/load", "planning", "index"]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(steps), desc="bench", leave=False)
    started = time.time()
    save_load = run_save_load(SaveLoadConfig(size_mib=run.size_mib, repetitions=run.repetitions,
                                             directory=run.directory), log=log).to_json()
    if bar is not None:
        bar.update()
    planning = (run_planning(worlds=(8, 64), items=250, repetitions=1, local_repetitions=1, validate_up_to=8,
                             sweep=(), log=log)
                if config.quick else run_planning(log=log))
    if bar is not None:
        bar.update()
    index = run_index_scale(items=run.index_items, repetitions=1 if config.quick else 3, directory=run.directory,
                            log=log, cli=not config.quick)
    if bar is not None:
        bar.update()
        bar.close()
    data = {"started": started, "seconds": time.time() - started, "config": dataclasses.asdict(config),
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
            "save_load": save_load, "planning": planning, "index": index}
    json_path = os.path.join(run.out_dir, "bench.json")
    with open(json_path, "w") as f:
        json.dump(data, f, indent=2)
    png_path = None
    if config.plot:
        png_path = os.path.join(run.out_dir, "bench.png")
        plot_save_load(save_load, png_path)
    text = "\n\n".join([format_table(save_load), format_planning(planning), format_index_scale(index)])
    return BenchReport(data, text, json_path, png_path)
