"""What stops a training run before or while it trains on garbage (recipes/checks.py, recipes/health.py), and
the environment's state saved with a checkpoint and restored on resume (recipes/env_state.py)."""

from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from agent_system.config import EnvConfig
from recipes.config import ConfigError, compose, validate_env

ROOT = Path(__file__).resolve().parent.parent


# ---- the executor: no silent fall-back to the 135M embedded one -------------------------------------------


def _checked(overrides: list[str]) -> None:
    from recipes.checks import check_executor_choice

    config = compose(overrides)
    check_executor_choice(config, validate_env(config))


def test_a_real_policy_with_no_executor_is_refused():
    with pytest.raises(ConfigError, match="env.executor.base_url is empty: the workflows of policy "
                                          "Qwen/Qwen2.5-7B-Instruct would run on the embedded"):
        _checked(["preset=qwen2.5-7b-a100-80g"])


@pytest.mark.parametrize("overrides", [
    ["preset=qwen2.5-7b-a100-80g", "env.executor.base_url=embedded"],  # asked for explicitly
    ["preset=qwen2.5-7b-a100-80g", "env.executor.base_url=http://x:8000/v1", "env.executor.model=m"],
    ["preset=cpu-local"],  # the embedded policy pairs with the embedded executor by default
    ["preset=cpu-rehearsal"],
])
def test_an_executor_chosen_or_an_embedded_policy_passes(overrides):
    _checked(overrides)


def test_the_judge_can_be_set_from_the_command_line():
    config = compose(["preset=cpu-local", "env.reward.judge.base_url=http://judge:8000/v1",
                      "env.reward.judge.model=j"])
    env = validate_env(config)
    assert (env.reward.judge.base_url, env.reward.judge.model) == ("http://judge:8000/v1", "j")
    assert EnvConfig().reward.judge.base_url == ""  # off by default


# ---- refusals of `python -m recipes.train`, the job's entry point ------------------------------------------


@pytest.fixture(scope="module")
def task_data(tmp_path_factory, data_dir) -> Path:
    out = tmp_path_factory.mktemp("task-data")
    subprocess.run([sys.executable, "-m", "data_prep.build", "--out", str(out), "--benchmarks", "gsm8k,humaneval",
                    "--mode", "task", "--task-repeats", "1", "--val-task-repeats", "1", "--data-dir", str(data_dir)],
                   check=True, capture_output=True, cwd=ROOT)
    return out


def _train(tmp_path: Path, task_data: Path, *overrides: str, data_dir: Path | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("AFLOW_DATA_DIR", "RAY_ADDRESS")}
    if data_dir is not None:
        env["AFLOW_DATA_DIR"] = str(data_dir)
    env["AFLOW_RUNS_DIR"] = str(tmp_path / "runs")
    return subprocess.run([sys.executable, "-m", "recipes.train", "preset=cpu-rehearsal",
                           f"data.train_files={task_data / 'train.parquet'}", f"data.val_files={task_data / 'val.parquet'}",
                           *overrides], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)


def _one_line_refusal(result: subprocess.CompletedProcess, start: str) -> str:
    assert result.returncode == 2, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("config error:")]
    assert len(lines) == 1 and lines[0].startswith(f"config error: {start}"), result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    return lines[0]


@pytest.mark.fit  # `python -m recipes.train`, refused before verl starts anything
def test_training_without_benchmark_data_is_refused_before_anything_starts(tmp_path, task_data):
    """The parquet names gsm8k; without AFLOW_DATA_DIR the workers could not load it and every reset would
    fail (HumanEval comes from its package, so it alone is not named)."""
    line = _one_line_refusal(_train(tmp_path, task_data), "data: the environment cannot load")
    assert "gsm8k validate" in line and "gsm8k test" in line and "humaneval" not in line
    assert "AFLOW_DATA_DIR" in line
    assert not (tmp_path / "runs" / "checkpoints").exists() or not any((tmp_path / "runs").rglob("global_step_*"))


@pytest.mark.fit  # `python -m recipes.train`, refused before verl starts anything
def test_an_executor_that_does_not_answer_is_refused_before_fit(tmp_path, task_data, data_dir):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    line = _one_line_refusal(_train(tmp_path, task_data, f"env.executor.base_url=http://127.0.0.1:{port}/v1",
                                    "env.executor.model=m", data_dir=data_dir), "executor: ")
    assert f"127.0.0.1:{port}" in line and "not reachable" in line


@pytest.mark.fit  # `python -m recipes.train`, refused before verl starts anything
def test_an_executor_that_does_not_serve_the_model_is_refused_before_fit(tmp_path, task_data, data_dir, fake_openai):
    fake_openai.only_its_model = True
    line = _one_line_refusal(_train(tmp_path, task_data, f"env.executor.base_url={fake_openai.base_url}",
                                    "env.executor.model=qwen-typo", data_dir=data_dir), "executor: ")
    assert "qwen-typo" in line and "does not exist" in line
    no_model = _train(tmp_path, task_data, f"env.executor.base_url={fake_openai.base_url}", data_dir=data_dir)
    assert "env.executor.model is empty" in _one_line_refusal(no_model, "env.executor.model is empty")


# ---- the health guard ----------------------------------------------------------------------------------------


def _counts(episodes=16, failed=0, groups=2, spread=1, reasons=()):
    return {"episodes": episodes, "failed": failed, "groups": groups, "spread": spread, "reasons": list(reasons)}


def test_the_guard_stops_after_k_failing_steps_in_a_row_only():
    from recipes.health import HealthGuard

    guard = HealthGuard(max_failed_share=0.5, failed_steps=3, flat_steps=0)
    assert guard.check(1, _counts(failed=12)) is None
    assert guard.check(2, _counts(failed=12)) is None
    assert guard.check(3, _counts(failed=8)) is None  # exactly half: not over the threshold, the count restarts
    assert guard.check(4, _counts(failed=9)) is None
    assert guard.check(5, _counts(failed=16)) is None
    reason = guard.check(6, _counts(failed=16, reasons=["reset failed: the executor went away"]))
    assert reason is not None and "100% of the episodes of step 6 failed" in reason
    assert "3 steps in a row" in reason and "the executor went away" in reason


def test_the_guard_stops_after_k_flat_steps_and_each_check_can_be_off():
    from recipes.health import HealthGuard

    guard = HealthGuard(failed_steps=0, flat_steps=2)
    assert guard.check(1, _counts(spread=0)) is None
    assert guard.check(2, _counts(spread=1)) is None
    assert guard.check(3, _counts(spread=0)) is None
    assert "no GRPO group had a reward spread for 2 steps" in guard.check(4, _counts(spread=0))
    off = HealthGuard(failed_steps=0, flat_steps=0)
    assert all(off.check(s, _counts(failed=16, spread=0)) is None for s in range(1, 50))


class _Trainer:
    """verl's RayPPOTrainer as the hooks see it: the step number and its checkpoint method."""

    def __init__(self, out: Path, step: int):
        self.out, self.global_steps, self.saved = out, step, []

    def _save_checkpoint(self):
        self.saved.append(self.global_steps)
        (self.out / f"global_step_{self.global_steps}" / "actor").mkdir(parents=True)


def test_a_tripped_guard_saves_a_checkpoint_records_why_and_stops(tmp_path):
    from omegaconf import OmegaConf

    from recipes.health import RunStopped, read_stopped
    from recipes.train import RunHooks

    config = OmegaConf.create({"trainer": {"default_local_dir": str(tmp_path)},
                               "env": {"workdir": str(tmp_path / "env"),
                                       "health": {"max_failed_share": 0.5, "failed_steps": 1, "flat_steps": 0}}})
    hooks = RunHooks(config)
    hooks.trainer = _Trainer(tmp_path, step=4)
    hooks.on_step(4, _counts(failed=1))  # healthy: nothing happens
    assert hooks.trainer.saved == [] and read_stopped(tmp_path) is None
    with pytest.raises(RunStopped, match="of the episodes of step 4 failed"):
        hooks.on_step(4, _counts(failed=10))
    assert hooks.trainer.saved == [4]
    stopped = read_stopped(tmp_path)
    assert stopped["step"] == 4 and stopped["checkpoint"] == str(tmp_path / "global_step_4")
    hooks.saved_step = 5  # verl already saved this step (save_freq): not saved twice
    hooks.trainer.global_steps = 5
    with pytest.raises(RunStopped):
        hooks.on_step(5, _counts(failed=10))
    assert hooks.trainer.saved == [4]


def test_a_failed_episode_does_not_turn_validation_metrics_nan():
    import numpy as np

    from agent_system.agent_loop.aflow_agent_loop import episode_info

    rows = [episode_info({"return": 0.5}, [0.0, 0.1], None), episode_info({"return": 0.0}, [], "reset failed: x")]
    for key in rows[0]:
        assert np.isfinite(np.mean([row[key] for row in rows])), key
    assert [row["failed_episodes"] for row in rows] == [0.0, 1.0]
    assert set(rows[0]) == set(rows[1])  # verl takes the keys from the first output


def test_why_actions_were_rejected_is_counted_by_kind():
    from agent_system.agent_loop.aflow_agent_loop import episode_info

    rejections = ["step 1 is CUSTOM; only REVIEW and TEST steps have rounds", "unknown action 'Sure,': write one of ADD",
                  "this edit gives a workflow already tried from this one"]
    row = episode_info({"return": 0.0}, [0.1, 0.1, 0.1, 0.0], None, rejections)
    assert row["valid_actions"] == 0.25
    assert (row["rejected_not_applicable"], row["rejected_unparsable"], row["rejected_no_change"]) == (0.25, 0.25, 0.25)
    assert row["rejected_no_such_step"] == row["rejected_other"] == 0.0
    assert set(row) == set(episode_info({"return": 0.0}, [], "reset failed: x"))


# ---- the environment's state is part of the checkpoint ---------------------------------------------------------


def test_resume_gives_the_search_tree_saved_with_the_checkpoint(fake_openai, data_dir, tmp_path):
    """A worker's search grows, verl saves step 1 (the env directory is copied with it), the search grows
    further, the run dies; on resume the directory is step 1's again and a new worker continues from
    exactly the tree (and experience) it had at step 1, not from the later one nor from scratch."""
    import asyncio

    from agent_system.environments.env_package.aflow.worker import AFlowWorker
    from recipes.env_state import restore, snapshot
    from tests.samples import action

    config = {"mode": "task", "max_turns": 1, "eval_subset_size": 1, "feedback_size": 1, "num_workers": 1,
              "run_id": "run-a", "data_dir": str(data_dir),
              "executor": {"base_url": fake_openai.base_url, "model": fake_openai.model, "max_tokens": 48}}
    run_dir = tmp_path / "run"
    env_dir = run_dir / "env"

    async def episode(worker, n: int) -> None:
        await worker.reset(f"e{n}", f"u{n}", {"extra_info": {"benchmark": "gsm8k"}})
        await worker.step(f"e{n}", action(n))
        await worker.close(f"e{n}")

    async def first_run() -> tuple[list[dict], list[dict]]:
        worker = AFlowWorker(config, str(env_dir))
        try:
            await episode(worker, 1)
            saved = await worker.tree_summary("gsm8k")
            snapshot(env_dir, run_dir / "global_step_1")
            await episode(worker, 2)
            return saved, await worker.tree_summary("gsm8k")
        finally:
            await worker.shutdown()

    async def resumed_run() -> tuple[list[dict], int]:
        worker = AFlowWorker(config, str(env_dir))
        try:
            state = await worker._task("gsm8k")
            return await worker.tree_summary("gsm8k"), len(state.pool.of_parent(1))
        finally:
            await worker.shutdown()

    saved, later = asyncio.run(first_run())
    assert len(saved) == 2 and len(later) == 3  # the root and step 1's workflow; then step 2's
    line = restore(run_dir / "global_step_1", env_dir)
    assert "restored" in line and "gsm8k" in line
    tree, experience = asyncio.run(resumed_run())
    assert tree == saved and experience == 1
    restore(None, env_dir)  # a run from scratch in the same directory: a fresh search
    tree, experience = asyncio.run(resumed_run())
    assert len(tree) == 1 and experience == 0


# ---- prompt lengths: a valid late turn is never refused ----------------------------------------------------------


@pytest.mark.parametrize("preset", ["qwen2.5-7b-a100-80g", "qwen2.5-7b-a100-40g-lora"])
def test_the_largest_observation_a_valid_action_can_lead_to_fits_the_prompt(preset, data_dir):
    """Late in training: a node whose workflow is as long as an action may be (env.max_action_chars), with
    dozens of long experience records, whose shown failures are the longest problems of the benchmark (as
    input and as output). With SmolLM2's tokenizer (Qwen2.5's, with 3x the vocabulary, is at least as dense)
    it must fit data.max_prompt_length, or such an episode would fail as ObservationTooLong."""
    from transformers import AutoTokenizer

    from aflow.benchmarks import BENCHMARKS
    from aflow.search.experience import Experience
    from agent_system.environments.env_package.aflow.prompts import task_observation
    from agent_system.policy_model import policy_directory
    from tests.samples import GRAPH

    config = compose([f"preset={preset}"])
    limit, chars = int(config.data.max_prompt_length), int(config.env.max_action_chars)
    tokenizer = AutoTokenizer.from_pretrained(policy_directory("embedded"))
    code = (GRAPH + "\n") * (chars // len(GRAPH) + 1)
    graph, prompt = code[: chars * 2 // 3], code[: chars - chars * 2 // 3]
    experience = [Experience(1, n + 2, "Added a ScEnsemble over three CoT answers, then Review and Format. " * 8, 0.5,
                             0.4) for n in range(40)]
    lengths = {}
    for name, bench in BENCHMARKS.items():
        problems = sorted(bench.load("validate", data_dir), key=lambda p: -len(str(p.inputs)))[:3]
        failures = [{"input": str(p.inputs), "output": str(p.inputs)[::-1], "error": "e " * 200} for p in problems]
        text = task_observation(name, graph, prompt, 0.5, experience, failures, bench.is_code)
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                            tokenize=True)
        lengths[name] = len(ids if isinstance(ids, list) else ids["input_ids"])
    assert max(lengths.values()) <= limit, (preset, limit, lengths)
    print(f"\n{preset}: largest observation {max(lengths.values())} tokens of {limit} ({lengths})")


# ---- the host: RAM per node, GPU memory per node, the driver ---------------------------------------------------


def test_an_nvidia_driver_older_than_torchs_cuda_is_refused_naming_the_fix():
    from recipes.preflight import driver_refusal

    line = driver_refusal("470.82.01", "12.8")
    assert line == ("the NVIDIA driver 470.82.01 is older than CUDA 12.8 (the installed torch's) needs (>= 525.60.13): "
                    "update the driver, or install torch built for an older CUDA")
    assert driver_refusal("550.54.15", "12.8") is None and driver_refusal("525.60.13", "12.1") is None
    assert driver_refusal("550.54.15", "13.0") is not None  # CUDA 13 needs the 580 series
    assert driver_refusal(None, "12.8") is None and driver_refusal("550.1", None) is None  # nothing to compare


def test_the_plan_holds_the_measured_nodes_to_the_preset():
    """The smallest GPU node's host RAM and GPU memory, the oldest driver, measured at launch (not the preset's
    declared GPU, not a laptop's RAM): 128 GB of host RAM cannot hold the 80 GB preset's ~158 GiB."""
    from recipes.preflight import _merge_facts, plan_for

    nodes = [{"host_memory_gb": 251.0, "gpu_memory_gb": 79.3, "nvidia_driver": "550.54.15"},
             {"host_memory_gb": 125.7, "gpu_memory_gb": 79.3, "nvidia_driver": "535.104.05"},
             {"host_memory_gb": 15.0}]  # a CPU-only node runs no trainer: not held to the plan
    facts = _merge_facts(nodes)
    assert facts == {"host_memory_gb": 125.7, "gpu_memory_gb": 79.3, "nvidia_driver": "535.104.05"}
    cluster = {"source": "test", "cpus": 32, "gpus": 2, "node_gpus": [1, 1], **facts}
    plan = plan_for(compose(["preset=qwen2.5-7b-a100-80g"]), cluster)
    assert not plan["fits"] and plan["message"].startswith("memory: needs 157.85 GiB of host RAM per node, the node "
                                                           "has 125.7: use LoRA")
    lora = plan_for(compose(["preset=qwen2.5-7b-a100-40g-lora"]), cluster)
    assert lora["fits"], lora["message"]
    small = plan_for(compose(["preset=qwen2.5-7b-a100-40g-lora"]), {**cluster, "gpu_memory_gb": 23.6})
    assert not small["fits"] and "more than 23.6 GiB" in small["message"]  # the measured GPU, not the declared 40


def test_a_cpu_head_started_by_launch_gets_the_logical_gpu_of_the_config():
    from recipes.dry_run import ray_head_args

    assert ray_head_args(compose(["preset=cpu-rehearsal"])) == ["--num-cpus", "12", "--num-gpus", "1"]
    assert ray_head_args(compose(["preset=qwen2.5-7b-a100-80g"])) == []


# ---- the executor going away mid-run -------------------------------------------------------------------------


def test_an_executor_outage_fails_the_episode_with_the_reason_and_loses_nothing(fake_openai, data_dir, tmp_path):
    """While the executor answers 500 to every retry, a measurement would score the outage (0 for every
    workflow): the step fails instead, naming it (the agent loop masks the episode; the health guard counts
    it). The tree built before stays; when the executor is back, episodes go on from it."""
    import asyncio

    from agent_system.environments.env_package.aflow.measure import ExecutorUnavailable
    from agent_system.environments.env_package.aflow.worker import AFlowWorker
    from tests.samples import action

    config = {"mode": "task", "max_turns": 1, "eval_subset_size": 1, "feedback_size": 1, "num_workers": 1,
              "run_id": "run-b", "data_dir": str(data_dir),
              "executor": {"base_url": fake_openai.base_url, "model": fake_openai.model, "max_tokens": 48}}

    async def go():
        worker = AFlowWorker(config, str(tmp_path / "env"))
        try:
            await worker.reset("e1", "u1", {"extra_info": {"benchmark": "gsm8k"}})
            await worker.step("e1", action(1))
            await worker.close("e1")
            before = await worker.tree_summary("gsm8k")
            fake_openai.default_fault = "500"
            await worker.reset("e2", "u2", {"extra_info": {"benchmark": "gsm8k"}})
            with pytest.raises(ExecutorUnavailable, match="the executor failed .* after every retry"):
                await worker.step("e2", action(2))
            await worker.close("e2", "step failed: ExecutorUnavailable")
            assert await worker.tree_summary("gsm8k") == before
            fake_openai.default_fault = None
            await worker.reset("e3", "u3", {"extra_info": {"benchmark": "gsm8k"}})
            info = (await worker.step("e3", action(3)))["info"]
            await worker.close("e3")
            assert info["valid"] and len(await worker.tree_summary("gsm8k")) == len(before) + 1
        finally:
            await worker.shutdown()

    asyncio.run(go())


@pytest.mark.parametrize("logprobs", [True, False])
def test_a_failed_episode_carries_log_probs_exactly_when_the_rollout_returns_them(logprobs):
    """verl concatenates every output's rollout log-probs when the batch's first output has them: one failed
    episode without them (a worker killed mid-step) crashed the whole step of the rehearsal."""
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    from agent_system.agent_loop.aflow_agent_loop import AFlowAgentLoop
    from agent_system.policy_model import policy_directory

    loop = object.__new__(AFlowAgentLoop)  # only what _failed_output reads
    loop.tokenizer = AutoTokenizer.from_pretrained(policy_directory("embedded"))
    loop.rollout_config = SimpleNamespace(prompt_length=512)
    loop.env_cfg = EnvConfig()
    out = loop._failed_output([{"role": "user", "content": "a task"}], "reset failed: ActorDiedError",
                              {"temperature": 1.0, "logprobs": logprobs})
    assert out.response_mask == [0] and out.extra_fields["episode_failed"].startswith("reset failed")
    assert out.response_logprobs == ([0.0] if logprobs else None)


def test_a_run_whose_executor_goes_away_is_stopped_by_the_guard_with_a_checkpoint(guard_run):
    """tests/fits.py `guard_run`: the executor answers the start-up probe, then fails every call. Every
    episode's measurement fails (ExecutorUnavailable), validation reports failed episodes instead of NaN, and
    the run stops at its first training step, where nothing is left to train on, with a checkpoint and one
    line. Before: verl's rollout correction raised on the all-masked batch, deep in the step, with no
    checkpoint."""
    from recipes.health import read_stopped

    result, ckpt = guard_run.run, guard_run.checkpoint_dir
    assert result.returncode == 1, result.output[-3000:]
    lines = [line for line in result.output.splitlines() if line.startswith("training stopped by the health guard:")]
    assert len(lines) == 1 and "every episode of step 1 failed" in lines[0], result.output[-3000:]
    assert "ExecutorUnavailable: the executor failed" in lines[0]
    stopped = read_stopped(ckpt)
    assert stopped["step"] == 1 and stopped["checkpoint"] == str(ckpt / "global_step_1")
    assert (ckpt / "global_step_1" / "actor").is_dir() and (ckpt / "global_step_1" / "env").is_dir()
    validation = result.metrics[0]  # before training: every validation episode failed too
    assert validation["val-aux/aflow/gsm8k/failed_episodes/mean@1"] == 1.0
    assert all(math.isfinite(v) for k, v in validation.items() if k.startswith("val-"))


def test_a_request_the_executor_refuses_stays_the_workflows_zero_not_an_outage(fake_openai, data_dir, tmp_path):
    """Only a transient failure after every retry is an outage (a failed, masked episode at -format_penalty,
    below any scored workflow). An error the request itself earns (here the server's 404 for the model) is
    not retried and stays the workflow's own 0: failing episodes is no way out of a low score."""
    import asyncio

    from agent_system.environments.env_package.aflow.worker import AFlowWorker
    from tests.samples import action

    fake_openai.only_its_model = True
    config = {"mode": "task", "max_turns": 1, "eval_subset_size": 1, "feedback_size": 1, "num_workers": 1,
              "run_id": "run-c", "data_dir": str(data_dir),
              "executor": {"base_url": fake_openai.base_url, "model": "not-served", "max_tokens": 48}}

    async def go():
        worker = AFlowWorker(config, str(tmp_path / "env"))
        try:
            await worker.reset("e1", "u1", {"extra_info": {"benchmark": "gsm8k"}})
            step = await worker.step("e1", action(1))
            await worker.close("e1")
            return step
        finally:
            await worker.shutdown()

    step = asyncio.run(go())  # an outage would raise ExecutorUnavailable here
    assert step["info"]["valid"] and step["reward"] <= 0.0
    assert fake_openai.count > 0 and all(r.fault is None for r in fake_openai.requests)  # refused, not faulted
