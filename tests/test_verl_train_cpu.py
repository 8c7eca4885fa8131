"""verl 0.9.1's own RayPPOTrainer.fit on this CPU machine, read from the session's main-job fit (tests/fits.py):
`bash recipes/run_local_grpo.sh` = `python -m recipes.train preset=cpu-local`, query mode on the canvas (actions
decoded under the grammar by the `cpu` rollout, log-probs recomputed under the same grammar by the actor's
constrained engine), the project's AFlowAgentLoop, real AFlowWorker Ray actors, the embedded executor (started
by the task runner), `algorithm.adv_estimator=workflow_gigpo`; a checkpoint through verl's own keys
(`trainer.save_freq`, `global_step_N/`, `latest_checkpointed_iteration.txt`; resuming is tested on the
rehearsal, tests/test_rehearsal.py). verl's metrics come from its JSONL file logger.

Each run is its own process, as a user would start it: verl's run_ppo starts (and owns) its Ray cluster.
"""

from __future__ import annotations

import math

from tests.verl_log import assert_learning_step


def test_verl_fit_updates_the_policy_every_step(main_job_run):
    first = main_job_run.first
    first.check()
    assert sorted(first.metrics) == [1, 2]
    for data in first.metrics.values():
        assert_learning_step(data)  # a finite policy loss and a non-zero gradient
        assert math.isfinite(data["critic/score/mean"])


def test_rollout_generates_with_the_actors_current_weights_under_the_same_grammar(main_job_run):
    """Per-token probabilities of the rollout match the actor's recomputation up to float noise at step 1 and
    at step 2 (after the first weight sync); an actor that ignored the grammar would be off by the log of the
    allowed mass, ~1 nat per token, and a rollout on stale weights by the update's size."""
    first = main_job_run.first
    first.check()
    for step in (1, 2):
        assert first.metrics[step]["training/rollout_probs_diff_max"] < 1e-3, (step, first.metrics[step])


def test_the_last_step_is_checkpointed_with_its_environment(main_job_run):
    main_job_run.first.check()
    ckpt = main_job_run.checkpoint_dir
    assert (ckpt / "global_step_2" / "actor").is_dir()
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "2"
    assert (ckpt / "global_step_2" / "env" / "llm-cache.sqlite").is_file()  # the environment's state, saved with it
    first = main_job_run.first
    step_s = ", ".join(f"{first.metrics[s]['timing_s/step']:.0f}" for s in (1, 2))
    print(f"\nverl fit on cpu: 2 steps {first.seconds:.0f} s (step times {step_s} s)")
