#!/usr/bin/env bash
# GRPO on Qwen2.5-7B-Instruct, task mode, one A100 80GB: the recipe a GPU user runs (`bash launch.sh` with
# no arguments on a machine with a CUDA GPU runs it).
#
#   AFLOW_DATA_DIR=/path/to/aflow/jsonl AFLOW_EXECUTOR_BASE_URL=http://HOST:8000/v1 AFLOW_EXECUTOR_MODEL=M \
#     bash recipes/run_qwen7b_grpo.sh [hydra overrides...]
#
# = `bash launch.sh preset=${AFLOW_PRESET:-qwen2.5-7b-a100-80g} ...`, which builds the task-mode parquet under
# $AFLOW_RUNS_DIR/data/task (./runs/data/task) when it is missing and sets up .venv once. Extra arguments are
# hydra overrides passed through (they come last, so they win), e.g. trainer.total_epochs=3
# trainer.logger=[console,wandb]. Check everything first without a GPU:  bash launch.sh --dry-run
# preset=qwen2.5-7b-a100-80g; rehearse the whole run on a CPU: bash launch.sh preset=cpu-rehearsal.
#
# The executor (the LLM that runs the workflows) is env.executor.*, from AFLOW_EXECUTOR_BASE_URL/MODEL here;
# without one the job refuses to start (env.executor.base_url=embedded asks for the bundled SmolLM2 anyway).
# The key, if the endpoint needs one, is read on the workers from the variable named by
# env.executor.api_key_env (never from the command line). AFLOW_POLICY_MODEL replaces the preset's policy.
set -euo pipefail
cd "$(dirname "$0")/.."
args=("preset=${AFLOW_PRESET:-qwen2.5-7b-a100-80g}")
[ -n "${AFLOW_POLICY_MODEL:-}" ] && args+=("actor_rollout_ref.model.path=$AFLOW_POLICY_MODEL")
[ -n "${AFLOW_EXECUTOR_BASE_URL:-}" ] && args+=("env.executor.base_url=$AFLOW_EXECUTOR_BASE_URL")
[ -n "${AFLOW_EXECUTOR_MODEL:-}" ] && args+=("env.executor.model=$AFLOW_EXECUTOR_MODEL")
exec bash launch.sh "${args[@]}" "$@"
