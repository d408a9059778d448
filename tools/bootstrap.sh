#!/usr/bin/env bash
# Creates .venv with pinned torch and the project's extras, once; re-runs only when pyproject changes.
# Usage: source-free; `bash tools/bootstrap.sh` prints nothing when already up to date.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
stamp=.venv/.forge-bootstrap
want=$(sha256sum pyproject.toml | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x .venv/bin/python ]; then
  exit 0
fi
echo "[bootstrap] creating .venv (torch==2.13.0 CPU + dcp-forge[dev])" >&2
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
# torch first and pinned: its CPU wheel is served locally; anything unpinned would pull a CUDA build.
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[dev]"
echo "$want" > "$stamp"
