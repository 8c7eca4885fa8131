#!/usr/bin/env bash
# Create or reuse .venv and install the project with the extras this machine needs.
# Sourced by launch.sh and tests/run.sh. Idempotent: a stamp of what was installed
# (pyproject.toml and the extras) makes a second run with nothing changed skip pip.
#   usage: source scripts/bootstrap.sh EXTRA[,EXTRA...]
set -euo pipefail
AFLOW_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${AFLOW_VENV:-$AFLOW_ROOT/.venv}"
extras="${1:-dev}"

has_cuda() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q GPU; }

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV" >&2
  python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
stamp="$VENV/.aflow-installed"
want="$(cat "$AFLOW_ROOT/pyproject.toml" | sha256sum | cut -c1-16) extras=$extras cuda=$(has_cuda && echo 1 || echo 0)"
if [ ! -f "$stamp" ] || ! grep -qxF "$want" "$stamp"; then
  echo "[setup] installing aflow-rl[$extras] into $VENV (first run only)" >&2
  "$PY" -m pip install -q --upgrade pip wheel setuptools >&2
  if ! has_cuda; then
    # The CPU build of torch; a bare `torch` requirement would pull a multi-GB CUDA build.
    "$PY" -m pip install -q "torch==2.13.0" >&2
  fi
  # llama-cpp-python builds from source once (about 8 minutes); pip caches the wheel.
  CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" "$PY" -m pip install -q -e "$AFLOW_ROOT[$extras]" >&2
  if ! has_cuda && [[ ",$extras," == *",rl,"* ]]; then
    # verl's declared dependencies pull GPU-only packages; on a CPU it imports with the `rl` extra.
    "$PY" -m pip install -q --no-deps "verl==0.9.1" >&2
  fi
  echo "$want" > "$stamp"
fi
export PATH="$VENV/bin:$PATH"
