"""Command line: kill ranks during async saves and check that what is committed loads bit-exactly.

    .venv/bin/python -m tools.crash_async --help      (from the repository root)

The machinery lives in tests/support/crash_async.py, where the tests use it too.
"""

import sys

from tests.support.crash_async import main

if __name__ == "__main__":
    sys.exit(main())
