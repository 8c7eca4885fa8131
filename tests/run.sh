#!/usr/bin/env bash
# All tests: sets up .venv (idempotent), lints, then runs pytest.
# Benchmark data: $AFLOW_DATA_DIR, else ../shared/data/aflow beside the repo when present.
set -euo pipefail
cd "$(dirname "$0")/.."
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q GPU; then
  source scripts/bootstrap.sh gpu,cpu,dev
else
  source scripts/bootstrap.sh cpu,rl,dev
fi
if [ -z "${AFLOW_DATA_DIR:-}" ] && [ -d ../shared/data/aflow ]; then
  export AFLOW_DATA_DIR="$(cd ../shared/data/aflow && pwd)"
fi
echo "[tests] data dir: ${AFLOW_DATA_DIR:-none (tests needing data are skipped)}"
python -m ruff check aflow agent_system recipes data_prep tests bench
set +e
python -m pytest "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then
  echo "[tests] pytest collected no tests" >&2
  exit 1
fi
exit "$status"
