#!/usr/bin/env bash
# Set up .venv and run the tests (what CI runs): the fast in-process tier first (about half a minute),
# then the end-to-end tier of real processes (marked e2e). Extra arguments go to one pytest run instead,
# e.g. ./scripts/test.sh -m "not e2e" or ./scripts/test.sh -k resume.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
# The project's own modules, compiled once. Where PYTHONDONTWRITEBYTECODE is set (CI's machine sets it), Python
# never caches them, so each of the hundreds of processes the tests start compiled trainer/ from source again
# (0.16 s of its imports against 0.04 s from the cache here). pip compiled everything in .venv already. Only a
# warm cache: a file that does not compile is for pytest to report, naming the test, not for this line to stop.
.venv/bin/python -m compileall -qq trainer scripts tests || true
if [ $# -gt 0 ]; then
  exec .venv/bin/python -m pytest -q "$@"
fi
.venv/bin/python -m pytest -q -m "not e2e" -n 2  # in-process tests, two at a time (60 s -> 35 s here)
# The e2e tier in three parts (tests/conftest.py says which test goes where). Tests that time nothing run two
# at a time, a test file per worker (a module's shared runs happen once); then the tests marked serial, which
# time a deadline (a watchdog, a peer's silence) and mostly wait, two at a time beside each other only; then
# the tests marked alone, which measure a speed or a CPU share or shape a network link, one at a time, so
# that no neighbour's load decides what they measure. All parts always run; the slowest durations are for
# whoever trims the tier.
status=0
.venv/bin/python -m pytest -q -m "e2e and not serial and not alone" -n 2 --dist loadfile --durations=15 || status=$?
.venv/bin/python -m pytest -q -m "e2e and serial and not alone" -n 2 --dist loadfile --durations=10 || status=$?
.venv/bin/python -m pytest -q -m "e2e and alone" --durations=10 || status=$?
exit "$status"
