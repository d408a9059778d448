"""Command line: a TCP proxy in front of an S3 server that injects faults (resets, stalls, outages).

    .venv/bin/python -m tools.fault_proxy --help      (from the repository root)

The machinery lives in tests/support/fault_proxy.py, where the tests use it too.
"""

import sys

from tests.support.fault_proxy import main

if __name__ == "__main__":
    sys.exit(main())
