#!/usr/bin/env bash
# The main job. Set-up (.venv, installs) is idempotent.
#
#   bash launch.sh                       # no CUDA GPU: recipes/run_local_grpo.sh, a few GRPO steps of the
#                                        # local trainer on the embedded default (SmolLM2-135M policy and
#                                        # executor, HumanEval query mode; reward/loss/time per step, then a
#                                        # checkpoint and a reward plot); with a CUDA GPU:
#                                        # recipes/run_qwen7b_grpo.sh (the verl job, A100 preset)
#   bash launch.sh --benchmark gsm8k --data-dir DIR --executor-base-url URL --executor-model M
#                                        # arguments starting with `--`: any `aflow evaluate` arguments
#                                        # (`bash launch.sh --benchmark humaneval` alone: the embedded executor)
#   bash launch.sh --dry-run [--strict] [OVERRIDES...]
#                                        # compose + validate the training config against verl's config
#                                        # classes, print it and the resource plan; starts nothing, no GPU.
#                                        # exit 0 valid (3 with --strict if the plan does not fit), 2 invalid
#   bash launch.sh OVERRIDES...          # GRPO training on a Ray cluster (hydra overrides, e.g.
#                                        # preset=qwen2.5-7b-a100-80g data.train_files=/abs/train.parquet)
#   bash launch.sh --help | -h           # usage of these modes; installs, starts and submits nothing
#
# Training: uses $RAY_ADDRESS, else the Ray cluster running on this machine, else starts a head here
# (`ray start --head`, token authentication: RAY_AUTH_MODE=token). It validates the config and checks the
# resource plan against the cluster (refusing, exit 3, with one message naming what to lower instead of
# waiting forever for resources), then submits `python -m recipes.train OVERRIDES` as a Ray job with
# this directory as the job's working_dir, so every worker imports aflow, agent_system and recipes.
# Outputs (checkpoints, tensorboard, hydra logs, the composed config) go to $AFLOW_RUNS_DIR (./runs).
set -euo pipefail
CALLER_PWD="$PWD"  # a relative --out is the caller's, not this directory's
cd "$(dirname "$0")"
ROOT="$PWD"
VENV="${AFLOW_VENV:-$ROOT/.venv}"

has_cuda() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q GPU; }
# One set of extras per machine kind, shared with tests/run.sh, so the two never reinstall each other's.
extras() { if has_cuda; then echo gpu,cpu,dev; else echo cpu,rl,dev; fi; }
has_trainer_deps() { [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import verl, hydra, ray" >/dev/null 2>&1; }

need_trainer_env() {
  source scripts/bootstrap.sh "$(extras)"
  if ! has_trainer_deps; then
    echo "launch.sh: verl, hydra-core and ray are not importable in $VENV after set-up" >&2
    exit 2
  fi
}

usage() {
  cat <<'USAGE'
usage: bash launch.sh [MODE ARGUMENTS]

  bash launch.sh
      the main job. No CUDA GPU: a few GRPO steps of the local trainer on the embedded default
      (recipes/run_local_grpo.sh); with a CUDA GPU: the verl job (recipes/run_qwen7b_grpo.sh).
  bash launch.sh --benchmark B [aflow evaluate arguments...]
      evaluate a workflow (arguments starting with `--` go to `aflow evaluate`; its options:
      `bash launch.sh --benchmark gsm8k --help`). Results go to --out DIR if given, else
      $AFLOW_RUNS_DIR/eval-<timestamp> (./runs); the path is printed at the end.
  bash launch.sh --dry-run [--strict] [OVERRIDES...]
      compose and validate the training config, print it and its resource plan; starts nothing.
      Exit 0 valid (3 with --strict when the plan does not fit this machine), 2 invalid.
  bash launch.sh OVERRIDES...
      GRPO training on a Ray cluster ($RAY_ADDRESS, else the one on this machine, else a head
      started here), e.g. preset=qwen2.5-7b-a100-80g data.train_files=/abs/train.parquet.
      Outputs go to $AFLOW_RUNS_DIR (./runs).
  bash launch.sh --help | -h
      this text.

Presets: qwen2.5-7b-a100-80g (default), qwen2.5-7b-a100-40g-lora, cpu-smoke, cpu-local.
AFlow search: `aflow optimize --help`.
USAGE
}

mode=train
if [ "$#" -gt 0 ] && { [ "$1" = "--help" ] || [ "$1" = "-h" ] || [ "$1" = "help" ]; }; then
  usage
  exit 0
fi
if [ "$#" -eq 0 ]; then
  if has_cuda; then mode=recipe; else mode=local; fi
elif [ "$1" = "--dry-run" ]; then
  mode=dry-run
  shift
elif [[ "$1" == --* ]]; then
  mode=evaluate
fi

case "$mode" in
local)
  exec bash recipes/run_local_grpo.sh
  ;;
evaluate)
  # the path really written: the user's --out (the last one given, as argparse takes it; a relative one
  # is made absolute against the caller's directory), else a new directory under $AFLOW_RUNS_DIR (./runs)
  out=""
  wants_help=0
  args=()
  prev=""
  for arg in "$@"; do
    if [ "$prev" = "--out" ] || [[ "$arg" == --out=* ]]; then
      value="${arg#--out=}"
      [[ "$value" == /* ]] || value="$CALLER_PWD/$value"
      out="$value"
      if [[ "$arg" == --out=* ]]; then arg="--out=$value"; else arg="$value"; fi
    fi
    case "$arg" in -h | --help) wants_help=1 ;; esac
    args+=("$arg")
    prev="$arg"
  done
  set -- "${args[@]}"
  source scripts/bootstrap.sh "$(extras)"
  if [ "$wants_help" = 1 ]; then  # aflow evaluate's help, and no results path (nothing is written)
    exec aflow evaluate "$@"
  fi
  if [ -z "$out" ]; then
    runs="${AFLOW_RUNS_DIR:-$ROOT/runs}"
    [[ "$runs" == /* ]] || runs="$CALLER_PWD/$runs"
    out="$runs/eval-$(date +%Y%m%d-%H%M%S)"
    set -- --out "$out" "$@"
  fi
  aflow evaluate "$@"
  echo "results: $out/results.jsonl  summary: $out/summary.json"
  exit 0
  ;;
recipe)
  exec bash recipes/run_qwen7b_grpo.sh
  ;;
dry-run)
  need_trainer_env
  exec python -m recipes.dry_run "$@"
  ;;
esac

# ------------------------------------------------------------------ training on a Ray cluster
need_trainer_env
export AFLOW_RUNS_DIR="${AFLOW_RUNS_DIR:-$ROOT/runs}"
stamp="$(date +%Y%m%d-%H%M%S)"
logdir="$AFLOW_RUNS_DIR/launch-$stamp"
mkdir -p "$logdir"
export TENSORBOARD_DIR="${TENSORBOARD_DIR:-$AFLOW_RUNS_DIR/tensorboard/$stamp}"

# A head started here, or any cluster whose token file is in ~/.ray, uses Ray 2.60's token auth.
if [ -z "${RAY_AUTH_MODE:-}" ] && [ -f "$HOME/.ray/auth_token" ]; then
  export RAY_AUTH_MODE=token
fi

preflight_address=""
if [ -n "${RAY_ADDRESS:-}" ]; then
  case "$RAY_ADDRESS" in
    # a dashboard address: the job measures the cluster itself (recipes/train.py) before starting verl
    http://* | https://*) ;;
    *) preflight_address="$RAY_ADDRESS" ;;
  esac
  echo "[launch] Ray cluster: $RAY_ADDRESS"
else
  if ! ray status >/dev/null 2>&1; then
    # on trainer.device=cpu the head gets the config's logical GPU and CPUs (ray_kwargs.ray_init)
    head_args="$(python -m recipes.dry_run --ray-head-args "$@")"
    echo "[launch] no Ray cluster on this machine: starting a head (ray start --head $head_args)" >&2
    export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
    ray start --head --disable-usage-stats $head_args ${AFLOW_RAY_START_ARGS:-} >"$logdir/ray-start.log" 2>&1 || {
      echo "launch.sh: ray start --head failed, see $logdir/ray-start.log" >&2
      exit 2
    }
  fi
  preflight_address=auto
  echo "[launch] Ray cluster: this machine (ray status; ray job list)"
fi

# Task data at the configured paths, built when missing (from $AFLOW_DATA_DIR; $AFLOW_BENCHMARKS, else all six)
python -m recipes.dry_run --build-missing-data "$@"

# Validate (exit 2, one line) and check the plan against the cluster (exit 3, one line).
# The composed config and the plan are kept in $logdir/dry_run.txt.
if [ -n "$preflight_address" ]; then
  python -m recipes.dry_run --strict --address "$preflight_address" "$@" >"$logdir/dry_run.txt"
  echo "[launch] config valid; resource plan fits the cluster (composed config: $logdir/dry_run.txt)"
else
  python -m recipes.dry_run "$@" >"$logdir/dry_run.txt"
  echo "[launch] config valid (composed config: $logdir/dry_run.txt); the job checks the resource plan against the cluster before starting verl"
fi

runtime_env_json="$(python - <<'EOF'
import json
import os

env_vars = {k: os.environ[k] for k in ("AFLOW_RUNS_DIR", "TENSORBOARD_DIR")}
# Forwarded when set. Secrets (API keys, WANDB_API_KEY) are never put here: the runtime env is
# visible in the dashboard and `ray job list`; set them in the environment the cluster was started from.
for key in ("AFLOW_DATA_DIR", "AFLOW_EXECUTOR_BASE_URL", "AFLOW_EXECUTOR_MODEL", "HF_HOME", "HF_ENDPOINT",
            "HF_HUB_OFFLINE", "WANDB_MODE", "WANDB_PROJECT", "WANDB_ENTITY", "VERL_LOGGING_LEVEL",
            "VERL_FILE_LOGGER_PATH", "VERL_FILE_LOGGER_ROOT"):
    if os.environ.get(key):
        env_vars[key] = os.environ[key]
print(json.dumps({
    # the working_dir (this checkout, uploaded) is on every worker's sys.path: aflow, agent_system,
    # recipes, data_prep and configs/ come from it; .gitignore'd paths are skipped too
    "excludes": [".venv", "runs", "outputs", "checkpoints", "tensorboard_log", ".git", "*.egg-info",
                 "__pycache__", ".pytest_cache", ".ruff_cache", "*.parquet"],
    "env_vars": env_vars,
}))
EOF
)"

submission_id="aflow-rl-$stamp"
echo "[launch] submitting $submission_id  (follow: ray job logs -f $submission_id; stop: ray job stop $submission_id)"
# A head that has just started may not take jobs yet ("No available agent to submit job"): try again for a minute.
for attempt in $(seq 1 30); do
  if ray job submit --no-wait --submission-id "$submission_id" --working-dir "$ROOT" \
      --runtime-env-json "$runtime_env_json" -- python -m recipes.train "$@" >"$logdir/submit.log" 2>&1; then
    break
  fi
  if ! grep -q "No available agent" "$logdir/submit.log" || [ "$attempt" = 30 ]; then
    cat "$logdir/submit.log" >&2
    echo "launch.sh: ray job submit failed (above)" >&2
    exit 1
  fi
  sleep 2
done
echo "[launch] job $submission_id submitted; its logs follow (Ctrl-C stops following, not the job; kept in $logdir/job.log)"
ray job logs --follow "$submission_id" 2>&1 | tee "$logdir/job.log" || true
# the job's final status: `ray job logs` ends with it; `ray job status` says it too (asked again when a busy
# dashboard does not answer)
for attempt in 1 2 3 4 5; do
  if ray job status "$submission_id" >"$logdir/job-status.txt" 2>&1; then break; fi
  sleep 3
done
if grep -q "Job '$submission_id' succeeded" "$logdir/job.log" "$logdir/job-status.txt"; then
  echo "[launch] job $submission_id succeeded"
  exit 0
fi
echo "[launch] job $submission_id did not succeed: $(grep -hE "Status (for|message)|Job '.*' (failed|stopped)" \
  "$logdir/job-status.txt" "$logdir/job.log" | head -n 3 | tr '\n' ' ')" >&2
exit 1
