#!/usr/bin/env python
"""P8: save planning for N items per rank x 8 ranks, simulated in one process, and how it scales.

    .venv/bin/python tools/bench_planning.py [--sizes 2500 5000 10000 20000] [--world 8] [--repetitions 3]

Prints each phase (slowest rank's local plan, the coordinator's global plan, finish) and the
critical path a real job waits for; the per-1,000-item column stays flat when planning is linear.
"""

from __future__ import annotations

import argparse
import json
import sys

from dcp_forge.bench.planning import format_planning, run_planning


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
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
