#!/usr/bin/env bash
# The main job: a small multi-rank training run that checkpoints, is interrupted, resumes and
# shows the result. Arguments go to `dcp-forge demo` (see `dcp-forge demo --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/bootstrap.sh
exec .venv/bin/dcp-forge demo "$@"
