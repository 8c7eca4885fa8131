#!/usr/bin/env bash
# All tests: sets up .venv (idempotent), lints, then runs pytest on two workers in a random order
# (pytest-randomly prints the seed; pass --randomly-seed=N to repeat an order) and prints the 15 slowest tests.
#   bash tests/run.sh                  # everything (<= 15 min on 2 idle cores)
#   bash tests/run.sh -m "not slow"    # the fast tier: no model, Ray or fit (<= 5 min)
# Benchmark data: $AFLOW_DATA_DIR, else ../shared/data/aflow beside the repo when present. With
# AFLOW_REQUIRE_DATA=1 (set by .ci/run) a missing data directory fails the run instead of skipping tests.
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
if [ "${AFLOW_REQUIRE_DATA:-}" = 1 ] && [ ! -d "${AFLOW_DATA_DIR:-/nonexistent}" ]; then
  echo "[tests] AFLOW_REQUIRE_DATA=1 but no data directory (set AFLOW_DATA_DIR to AFlow's split files)" >&2
  exit 2
fi
echo "[tests] data dir: ${AFLOW_DATA_DIR:-none (tests needing data are skipped)}"
python -m ruff check aflow agent_system recipes data_prep tests bench
set +e
# two workers (this machine's cores; AFLOW_TEST_WORKERS=0 for one process): every slow test runs on one of
# them, which owns the Ray cluster, the models and the shared verl fits (tests/tiers.py, tests/fits.py)
python -m pytest -n "${AFLOW_TEST_WORKERS:-2}" --dist loadgroup --durations=15 "$@"
status=$?
if [ "$status" -eq 0 ] && [ "$#" -eq 0 ]; then
  # the full run only: a node that refuses namespaces (a container) must keep rewards unforgeable too
  echo "[tests] again as on a node without namespaces (AFLOW_SANDBOX_NAMESPACES=0): the sandbox, code checker," \
       "forgery and hostile-answer suites"
  AFLOW_SANDBOX_NAMESPACES=0 python -m pytest -n "${AFLOW_TEST_WORKERS:-2}" -q -m "not slow" \
    tests/test_sandbox.py tests/test_sandbox_view.py tests/test_sandbox_zygote.py tests/test_sandbox_unprivileged.py \
    tests/test_code_forgery.py tests/test_hostile_answers.py
  status=$?
fi
set -e
if [ "$status" -eq 5 ]; then
  echo "[tests] pytest collected no tests" >&2
  exit 1
fi
exit "$status"
