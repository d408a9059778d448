"""Command line: install, start, stop or query the local S3-compatible test server (SeaweedFS or moto).

    .venv/bin/python -m tools.s3_server --help      (from the repository root)

The machinery lives in tests/support/s3_server.py, where the tests use it too.
"""

import sys

from tests.support.s3_server import main

if __name__ == "__main__":
    sys.exit(main())
