"""verl 0.9.1's own RayPPOTrainer.fit on this CPU machine: `python -m recipes.train preset=cpu-local`.

Two training steps in query mode on the canvas (gsm8k rows from data_prep.build --action-space canvas: actions
decoded under the grammar by the `cpu` rollout, log-probs recomputed under the same grammar by the actor's
constrained engine) with the project's AFlowAgentLoop, real
AFlowWorker Ray actors, the embedded executor (started by the task runner: `env.executor.base_url` is empty)
and `algorithm.adv_estimator=workflow_gigpo`, then a checkpoint through verl's own keys
(`trainer.save_freq`, `global_step_N/`, `latest_checkpointed_iteration.txt`), then a second run with
`trainer.resume_mode=auto` that continues at step 3. verl's metrics come from its JSONL file logger.

Each run is its own process, as a user would start it: verl's run_ppo starts (and owns) its Ray cluster.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from tests.verl_log import logger_env, step_metrics

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def query_parquet(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("verl-query-data")
    subprocess.run([sys.executable, "-m", "data_prep.build", "--benchmarks", "gsm8k", "--mode", "query",
                    "--action-space", "canvas", "--out", str(out), "--data-dir", str(data_dir)], check=True,
                   capture_output=True, cwd=ROOT)
    path = out / "few.parquet"
    pd.read_parquet(out / "train.parquet").iloc[:4].to_parquet(path)
    return path


def train(parquet: Path, data_dir: Path, ckpt: Path, metrics: Path, steps: int, resume: str) -> tuple[float, str]:
    """`python -m recipes.train preset=cpu-local ...` in a fresh process; returns its wall time and output."""
    overrides = [
        "preset=cpu-local", f"data.train_files={parquet}", f"data.val_files={parquet}",
        # one prompt x 2 rollouts per step: the smallest GRPO group, ~400-token canvas prompts, two turns
        "data.train_batch_size=1", "actor_rollout_ref.actor.ppo_mini_batch_size=1",
        "data.max_response_length=192", "actor_rollout_ref.rollout.n=2",
        # both rollouts may well get the same reward (advantages 0); an entropy term keeps the gradient
        # non-zero regardless
        "actor_rollout_ref.actor.entropy_coeff=0.01",
        # a step large enough that a rollout still on the old weights would show in the log-prob diff
        "actor_rollout_ref.actor.optim.lr=1e-4",
        # rollout log-probs, and the actor's recomputation of them (cpu-local's bypass mode skips it): verl
        # then reports how far the two are apart (weights in sync, and the same grammar on both sides)
        "actor_rollout_ref.rollout.calculate_log_probs=true", "algorithm.rollout_correction.bypass_mode=false",
        "algorithm.adv_estimator=workflow_gigpo",
        "env.mode=query", "env.action_space=canvas", "env.max_turns=2", "env.eval_subset_size=1", "env.num_workers=1",
        f"env.data_dir={data_dir}", "env.executor.max_tokens=48",
        f"trainer.default_local_dir={ckpt}", f"trainer.total_training_steps={steps}", "trainer.save_freq=2",
        f"trainer.resume_mode={resume}", "trainer.logger=[console,file]",
        # total_training_steps is the bound; cpu-smoke's single epoch would end a resumed run at the
        # epoch boundary without a step (verl exits 0 then)
        "trainer.total_epochs=100",
    ]
    env = {**os.environ, **logger_env(metrics), "AFLOW_RUNS_DIR": str(ckpt.parent / "runs"),
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    env.pop("RAY_ADDRESS", None)
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "recipes.train", *overrides], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, (result.stdout[-4000:], result.stderr[-6000:])
    return time.monotonic() - started, result.stdout + result.stderr


def test_verl_fit_on_cpu_trains_checkpoints_and_resumes(data_dir, query_parquet, tmp_path):
    ckpt = tmp_path / "ckpt"
    first_s, output = train(query_parquet, data_dir, ckpt, tmp_path / "first.jsonl", steps=2, resume="disable")
    assert "started the embedded executor at http://127.0.0.1:" in output  # by the task runner
    first = step_metrics(tmp_path / "first.jsonl")
    assert sorted(first) == [1, 2]
    for step, data in first.items():
        assert math.isfinite(data["actor/pg_loss"]), (step, data["actor/pg_loss"])
        assert math.isfinite(data["actor/grad_norm"]) and data["actor/grad_norm"] > 0, (step, data["actor/grad_norm"])
        assert math.isfinite(data["critic/score/mean"])
    # the rollout generated with the actor's current weights (synced after step 1) under the grammar the
    # actor's engine applies too: per-token probabilities match the actor's recomputation up to float noise
    # (an actor that ignored the grammar would be off by the log of the allowed mass, ~1 nat per token)
    for step in (1, 2):
        assert first[step]["training/rollout_probs_diff_max"] < 1e-3, (step, first[step])
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "2"
    assert (ckpt / "global_step_2" / "actor").is_dir()

    second_s, _ = train(query_parquet, data_dir, ckpt, tmp_path / "second.jsonl", steps=3, resume="auto")
    second = step_metrics(tmp_path / "second.jsonl")
    assert sorted(second) == [3], sorted(second)  # continued from the saved step, not from scratch
    assert math.isfinite(second[3]["actor/pg_loss"]) and second[3]["actor/grad_norm"] > 0
    step_times = ", ".join(f"{first[s]['timing_s/step']:.0f}" for s in (1, 2))
    print(f"\nverl fit on cpu: 2 steps {first_s:.0f} s (step times {step_times} s), resumed step 3 "
          f"{second_s:.0f} s (step {second[3]['timing_s/step']:.0f} s)")
