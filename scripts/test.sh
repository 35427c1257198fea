#!/usr/bin/env bash
# Set up .venv and run the tests (what CI runs): the fast in-process tier (about a minute) and the end-to-end
# tier of real processes (marked e2e). Extra arguments go to one pytest run instead,
# e.g. ./scripts/test.sh -m "not e2e" or ./scripts/test.sh -k resume.
#
# The e2e tier has three parts (tests/conftest.py says which test is in which):
#   parallel  tests that time nothing, two at a time (pytest-xdist, a test file per worker);
#   serial    tests that time a watchdog, a heartbeat or a restart: one at a time, never beside an equal;
#   alone     benchmarks' tests, which measure CPU shares, other load and speed ratios: the machine to themselves.
# Where this user may make a cgroup v1 `cpu` group (root, Linux), the parallel part runs from the start in
# a group of an eighth of the usual CPU weight (cpu.shares 128): it takes the CPU that the fast tier and the
# serial part leave idle, and little more where they want both cores (not none: its ranks still meet in
# their collectives); the alone part starts once it is done. Elsewhere the parts run one after another.
# Every part always runs; the slowest durations are for whoever trims the tier.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
if [ $# -gt 0 ]; then
  exec .venv/bin/python -m pytest -q "$@"
fi
PYTEST=(.venv/bin/python -m pytest -q)
PARALLEL=(-m "e2e and not serial" -n 2 --dist loadfile --durations=15)

low_group() {  # a cgroup of an eighth of the usual CPU weight; prints its path, or nothing
  local root=/sys/fs/cgroup/cpu group
  [ "$(id -u)" = 0 ] && [ -w "$root/cgroup.procs" ] || return 0
  group="$root/mlx-dp-tests-low-$$"
  mkdir "$group" 2>/dev/null || return 0
  if ! echo 128 >"$group/cpu.shares" 2>/dev/null; then
    rmdir "$group"
    return 0
  fi
  echo "$group"
}

status=0
group=$(low_group)
if [ -n "$group" ]; then
  log=$(mktemp)
  trap 'rm -f "$log"; rmdir "$group" 2>/dev/null || true' EXIT
  (echo "$BASHPID" >"$group/cgroup.procs" && exec "${PYTEST[@]}" "${PARALLEL[@]}") >"$log" 2>&1 &
  background=$!
  echo "e2e tests that time nothing: running beside the rest at low CPU weight ($group); their report follows"
fi
"${PYTEST[@]}" -m "not e2e" || status=$?
if [ -z "$group" ]; then
  "${PYTEST[@]}" "${PARALLEL[@]}" || status=$?
fi
"${PYTEST[@]}" -m "e2e and serial and not alone" --durations=15 || status=$?
if [ -n "$group" ]; then
  wait "$background" || status=$?
  echo "---- e2e tests that time nothing (two at a time, at low CPU weight):"
  cat "$log"
fi
"${PYTEST[@]}" -m "e2e and alone" --durations=10 || status=$?
exit "$status"
