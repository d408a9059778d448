"""Command line: many consecutive saves; resources (RSS, threads, fds, children) must not grow.

    .venv/bin/python -m tools.soak --help      (from the repository root)

The machinery lives in tests/support/soak.py, where the tests use it too.
"""

import sys

from tests.support.soak import main

if __name__ == "__main__":
    sys.exit(main())
