#!/usr/bin/env bash
# GRPO on Qwen2.5-7B-Instruct, task mode, one A100 80GB: the recipe a GPU user runs.
#
#   AFLOW_DATA_DIR=/path/to/aflow/jsonl AFLOW_EXECUTOR_BASE_URL=http://HOST:8000/v1 AFLOW_EXECUTOR_MODEL=M \
#     bash recipes/run_qwen7b_grpo.sh [hydra overrides...]
#
# Builds the task-mode parquet files under $AFLOW_RUNS_DIR/data/task (./runs/data/task) when they are
# missing, then `bash launch.sh preset=qwen2.5-7b-a100-80g ...`. Extra arguments are hydra overrides
# passed through (they come last, so they win), e.g. trainer.total_epochs=3 trainer.logger=[console,wandb].
# Check everything first without a GPU:  bash launch.sh --dry-run preset=qwen2.5-7b-a100-80g
#
# The executor (the LLM that runs the workflows) is env.executor.*; the key, if the endpoint needs one,
# is read on the workers from the variable named by env.executor.api_key_env (never from the command line).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q GPU; then
  source scripts/bootstrap.sh gpu,cpu
else
  source scripts/bootstrap.sh cpu
fi

export AFLOW_RUNS_DIR="${AFLOW_RUNS_DIR:-$ROOT/runs}"
DATA="${AFLOW_TASK_DATA:-$AFLOW_RUNS_DIR/data/task}"
BENCHMARKS="${AFLOW_BENCHMARKS:-gsm8k,math,humaneval,mbpp,hotpotqa,drop}"

# 2 validation rows per benchmark: a validation episode costs as much as a training one
bash scripts/build_data_if_missing.sh "$DATA" --benchmarks "$BENCHMARKS" --mode task --val-task-repeats 2

if [ -z "${AFLOW_EXECUTOR_BASE_URL:-}" ]; then
  echo "[recipe] AFLOW_EXECUTOR_BASE_URL is not set: workflows run on the embedded SmolLM2 executor (CPU, weak)" >&2
fi

exec bash launch.sh \
  preset=qwen2.5-7b-a100-80g \
  data.train_files="$DATA/train.parquet" \
  data.val_files="$DATA/val.parquet" \
  actor_rollout_ref.model.path="${AFLOW_POLICY_MODEL:-Qwen/Qwen2.5-7B-Instruct}" \
  env.executor.base_url="${AFLOW_EXECUTOR_BASE_URL:-}" \
  env.executor.model="${AFLOW_EXECUTOR_MODEL:-}" \
  "$@"
