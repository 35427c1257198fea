#!/usr/bin/env bash
# Create .venv (if missing) and install mlx-dp with its test extras into it.
# Picks mlx's Metal build on macOS and the CPU build (mlx[cpu]) on Linux via pyproject markers.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip >/dev/null 2>&1 || true
.venv/bin/python -m pip install --quiet -e ".[test]"
.venv/bin/python -c "import mlx.core as mx, mlx_lm, trainer; print(f'mlx {mx.__version__}, mlx-lm {mlx_lm.__version__}, mlx-dp {trainer.__version__} ready in .venv')"
