"""Proof of learning through verl's own trainer: `python -m recipes.train preset=cpu-local` (RayPPOTrainer.fit).

The operator-chain toy task of tests/toy_task.py (pick CHAIN_LENGTH operators from AFlow's catalogue, shown
as a lettered menu, for a named benchmark; sampling restricted to the menu letters through the rollout's
`allowed_token_ids`; reward = operator overlap with the benchmark's target set after the real static
checks) with a tiny randomly initialised Llama (hidden 64, 2 layers) over the toy prompts' own word-level
vocabulary (47 tokens: tests/toy_task.save_toy_tokenizer) as `actor_rollout_ref.model.path`. The toy loop is
registered with verl's AgentLoopWorker through an agent-loop YAML
(`actor_rollout_ref.rollout.agent.agent_loop_config_path`) and every parquet row names it (`agent_name`). No
AFlow environment: `env.executor.base_url` is set, so the task runner does not start the embedded executor,
and the toy loop never calls it. The two runs are the session's shared fit `toy_learning_runs` (tests/fits.py).

Everything else is verl's: the cpu rollout (agent_system/verl_cpu, which takes the actor's weights after
every update), GRPO advantages, the PPO clipped loss with old log-probs recomputed by the actor (the
rollout's are of the letter-restricted distribution; see toy_task.fit_overrides), no KL (no reference
model), FSDP2's AdamW on CPU. The per-step mean reward is verl's own `critic/score/mean`, read from its file
logger (tests/verl_log.py).

Why the small vocabulary: verl's FSDP engine computes log-probs over the whole vocabulary at every position,
so with SmolLM2's 49k tokens a step of 4 prompts x 8 samples took ~7 s (~5.7 s of it the update) and the two
40-step runs ~12 minutes; with 47 tokens a step takes ~1.7 s (measured on 2 cores with two busy loops beside
it) and Ray/worker start-up dominates each run. Learning is also quicker: a 40-step run at lr 0.01 rose from
0.14 (step 1) to 0.37 by step 5 and stayed at 0.33-0.42 to step 33, so STEPS is 20. The rollout's sampling
is not seeded (CPUGenerationServer passes no base_seed): "same seeds" covers the model init and verl's seeds
(data loader), not the sampled letters.

Pass: the lr > 0 run's best WINDOW-step mean reward beats the lr = 0 control's (same seeds, same code path)
by MARGIN, and the control does not rise. Each run is its own process, as a user would start it.
"""

from __future__ import annotations

from statistics import fmean as mean

from tests.toy_task import BATCH, LR, SAMPLES, STEPS

# The trained run's best WINDOW-step mean reward must beat the control's best by MARGIN, each the highest
# mean over WINDOW consecutive steps (the same selection on both sides). Not first-vs-last steps of one run:
# learning can start within the first steps (a run measured 0.219 -> 0.364 over its first/last 5 missed a
# margin of 0.15), and at lr 0.01 a run can collapse after its peak (measured: 0.42 at step 22, 0.10-0.14
# from step 35): the test proves that verl's update raises the reward, not that this toy run is stable.
# A step's mean reward varies by ~0.035 (an lr=0 run's steps: 0.12 to 0.25), a 10-step mean by ~0.011.
WINDOW = 10
MARGIN = 0.12  # measured: best 10 steps 0.40 trained vs 0.18-0.19 control
# the control's last WINDOW steps over its first (measured: -0.031); a control that learned rises ~+0.2
CONTROL_DRIFT = 0.06


def rewards_of(run, lr: float) -> list[float]:
    """verl's per-step mean reward of one run of the shared fit (printed with its timing)."""
    run.check()
    assert sorted(run.metrics) == list(range(1, STEPS + 1)), (sorted(run.metrics), run.output[-3000:])
    rewards = [run.metrics[s]["critic/score/mean"] for s in range(1, STEPS + 1)]
    step_s = [run.metrics[s]["timing_s/step"] for s in range(1, STEPS + 1)]
    print(f"\nverl toy lr={lr}: reward first {WINDOW} steps {mean(rewards[:WINDOW]):.3f}, "
          f"last {WINDOW} {mean(rewards[-WINDOW:]):.3f}, best {WINDOW} {best_window(rewards):.3f}; "
          f"{STEPS} steps of {BATCH}x{SAMPLES} in {run.seconds:.0f} s wall, {mean(step_s):.2f} s/step (verl timing)"
          f"\n  rewards: {' '.join(f'{r:.2f}' for r in rewards)}")
    return rewards


def best_window(rewards: list[float]) -> float:
    """The highest mean reward over WINDOW consecutive steps."""
    return max(mean(rewards[i:i + WINDOW]) for i in range(len(rewards) - WINDOW + 1))


def test_verl_policy_learns_toy_reward_and_the_lr0_control_does_not(toy_learning_runs):
    trained, control = rewards_of(toy_learning_runs[LR], LR), rewards_of(toy_learning_runs[0.0], 0.0)
    # random menu letters earn ~0.17; without `allowed_token_ids` reaching the cpu rollout, a random-init
    # model would sample from the whole vocabulary and earn less
    assert mean(control[:WINDOW]) > 0.08, f"sampling was not restricted to the menu letters: {control[:WINDOW]}"
    rise = mean(control[-WINDOW:]) - mean(control[:WINDOW])
    assert rise < CONTROL_DRIFT, f"the lr=0 control moved by {rise:+.3f}: {control}"
    gain = best_window(trained) - best_window(control)
    assert gain >= MARGIN, f"the policy did not learn: best {WINDOW} steps {gain:+.3f} over the control's"
