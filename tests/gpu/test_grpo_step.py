"""End to end on a CUDA machine: one GRPO step of a Qwen policy through `bash launch.sh` (Ray job, verl's
classic trainer, vLLM rollout, the AFlow agent loop and workers). Skipped without CUDA.

    bash tests/run.sh tests/gpu -m gpu
    AFLOW_GPU_TEST_MODEL=Qwen/Qwen2.5-7B-Instruct bash tests/run.sh tests/gpu -m gpu   # the production model

The policy defaults to Qwen2.5-0.5B-Instruct (same family and chat template, minutes instead of an hour);
the executor is $AFLOW_EXECUTOR_BASE_URL / $AFLOW_EXECUTOR_MODEL, else the embedded SmolLM2 server.
Uses the Ray cluster at $RAY_ADDRESS, else the one on this machine, else starts a head (left running).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.verl_log import assert_learning_step, logger_env, step_metrics

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

pytestmark = pytest.mark.gpu

ROOT = Path(__file__).resolve().parents[2]
MODEL = os.environ.get("AFLOW_GPU_TEST_MODEL", "Qwen/Qwen2.5-0.5B-Instruct")


@pytest.mark.timeout(3600)
def test_one_grpo_step_via_launch_sh(tmp_path):
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["AFLOW_RUNS_DIR"] = str(tmp_path / "runs")
    env.update(logger_env(tmp_path / "metrics.jsonl"))  # forwarded to the job by launch.sh
    data = tmp_path / "runs" / "data"
    build = subprocess.run(
        [sys.executable, "-m", "data_prep.build", "--benchmarks", "humaneval", "--mode", "task", "--out", str(data),
         "--task-repeats", "2", "--val-task-repeats", "1"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert build.returncode == 0, build.stderr[-2000:]
    overrides = [
        "preset=qwen2.5-7b-a100-80g",
        f"actor_rollout_ref.model.path={MODEL}",
        f"data.train_files={data / 'train.parquet'}",
        f"data.val_files={data / 'val.parquet'}",
        # one step of 2 tasks x 2 episodes, one short turn each
        "data.train_batch_size=2",
        "actor_rollout_ref.rollout.n=2",
        "actor_rollout_ref.actor.ppo_mini_batch_size=2",
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=1",
        "actor_rollout_ref.rollout.agent.num_workers=1",
        "actor_rollout_ref.rollout.max_num_seqs=4",
        "env.num_workers=1",
        "env.max_turns=1",
        "env.eval_subset_size=2", "env.feedback_size=1",
        "trainer.total_training_steps=1",
        "trainer.val_before_train=false",
        "trainer.test_freq=-1",
        "trainer.save_freq=-1",
        "trainer.logger=[console,file]",
        "trainer.experiment_name=gpu-test",
    ]
    result = subprocess.run(["bash", str(ROOT / "launch.sh"), *overrides], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=3500)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-5000:]
    steps = step_metrics(tmp_path / "metrics.jsonl")
    assert 1 in steps, log[-5000:]
    assert_learning_step(steps[1])  # a finite loss and a non-zero gradient, not merely "step:1" printed
