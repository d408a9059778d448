#!/usr/bin/env python
"""inspect and diff of checkpoints with a 1,000,000-item index (synthetic, see dcp_forge/bench/index_scale.py).

    .venv/bin/python tools/bench_index.py [--items 1000000] [--repetitions 3] [--dir DIR] [--no-cli]

Prints the library-call time of ``inspect`` and of two diffs (rows aligned: compared positionally;
keys dropped: compared by a join), and the same as ``dcp-forge`` commands in a fresh interpreter.
"""

from __future__ import annotations

import argparse
import json
import sys

from dcp_forge.bench.index_scale import format_index_scale, run_index_scale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=1_000_000, help="rows of each synthetic index")
    parser.add_argument("--repetitions", type=int, default=3, help="repetitions; medians are reported")
    parser.add_argument("--dir", default=None, help="scratch directory (default: the temp dir)")
    parser.add_argument("--no-cli", action="store_true", help="skip timing the dcp-forge commands")
    parser.add_argument("--json", default=None, help="also write the results as JSON to this file")
    args = parser.parse_args(argv)
    result = run_index_scale(args.items, repetitions=args.repetitions, directory=args.dir, cli=not args.no_cli)
    print(format_index_scale(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
