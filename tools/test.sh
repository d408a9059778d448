#!/usr/bin/env bash
# The test command: sets everything up from a fresh clone, then runs the whole suite.
# The local S3 server (SeaweedFS) is started by the test session itself (tests/conftest.py).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/bootstrap.sh
exec .venv/bin/python -m pytest -q "$@"
