#!/usr/bin/env python
"""Save and load a 1 GiB state on one rank: dcp_forge vs DCP defaults / thread_count=2 / torch.save
and the disk's durable-write and cold-read limits, measured in the same run.

    .venv/bin/python tools/bench_save_load.py [--size-mib 1024] [--tensors 16] [--repetitions 5]
                                              [--dir DIR] [--json out.json]

Prints one line per measurement, then a markdown table of GB/s and ratios to the limits (median over
repetitions). ``dcp-forge bench`` runs this together with the planning and index benchmarks.
"""

from __future__ import annotations

import argparse
import json
import sys

from dcp_forge.bench.save_load import SaveLoadConfig, format_table, run_save_load


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
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
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
