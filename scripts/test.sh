#!/usr/bin/env bash
# Set up .venv and run the tests (what CI runs): the fast in-process tier first (about two minutes),
# then the end-to-end tier of real processes (marked e2e). Extra arguments go to one pytest run instead,
# e.g. ./scripts/test.sh -m "not e2e" or ./scripts/test.sh -k resume.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
if [ $# -gt 0 ]; then
  exec .venv/bin/python -m pytest -q "$@"
fi
.venv/bin/python -m pytest -q -m "not e2e"
exec .venv/bin/python -m pytest -q -m e2e --durations=15  # the slowest, for whoever trims the tier
