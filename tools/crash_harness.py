"""Command line: kill ranks mid-save at random moments and check that the newest committed checkpoint always loads bit-exactly.

    .venv/bin/python -m tools.crash_harness --help      (from the repository root)

The machinery lives in tests/support/crash_harness.py, where the tests use it too.
"""

import sys

from tests.support.crash_harness import main

if __name__ == "__main__":
    sys.exit(main())
