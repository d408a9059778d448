#!/usr/bin/env bash
# Creates .venv with pinned torch and the project's extras, once; re-runs only when pyproject changes.
# Usage: source-free; `bash tools/bootstrap.sh` prints nothing when already up to date, and a line per
# step (with pip's own progress for the installs, which take minutes) when it has work to do.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
stamp=.venv/.forge-bootstrap
want=$(sha256sum pyproject.toml | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x .venv/bin/python ]; then
  exit 0
fi
step() { echo "[bootstrap $(( SECONDS / 60 ))m$(( SECONDS % 60 ))s] $*" >&2; }
pip_install() { .venv/bin/python -m pip install --progress-bar on --no-color "$@" 1>&2; }
step "1/4 setting up .venv (Python: $PY)"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
step "2/4 upgrading pip"
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || step "    (pip upgrade skipped; the installed pip is used)"
# torch first and pinned: its CPU wheel is served locally; anything unpinned would pull a CUDA build.
step "3/4 installing torch==2.13.0 (CPU wheel, hundreds of MB: the longest step)"
pip_install "torch==2.13.0"
step "4/4 installing dcp-forge[dev] in editable mode, with its dependencies and test tools"
pip_install -e ".[dev]"
echo "$want" > "$stamp"
step "done: .venv is ready"
