#!/usr/bin/env bash
# The test command: sets everything up from a fresh clone, type-checks the package, then runs the whole suite.
# The local S3 server (SeaweedFS) is started by the test session itself (tests/conftest.py).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/bootstrap.sh
# The package's annotations first (pyproject.toml's [tool.mypy] says what; its cache makes reruns quick).
.venv/bin/mypy
exec .venv/bin/python -m pytest -q "$@"
