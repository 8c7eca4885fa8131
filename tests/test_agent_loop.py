"""The verl agent loop, for real: verl's AgentLoopBase machinery, a CPU generation backend that
honours `server_manager.generate` (SmolLM2 through transformers), real AFlowWorker actors on a
local Ray cluster, and the embedded executor."""

from __future__ import annotations

import asyncio
import math
import time
import uuid

import hydra
import pytest
import yaml
from omegaconf import OmegaConf

from agent_system.config import EnvConfig
from tests.samples import action


def trainer_config(server, data_dir, workdir, **env):
    # actor_timeout_s: a reset scores the initial workflow with the embedded llama.cpp executor, ~5 s
    # alone but 112 s with two other busy processes on the 2 cores (its threads wait for each other).
    return OmegaConf.create({
        "actor_rollout_ref": {"rollout": {"prompt_length": 4096, "response_length": 2048, "n": 2}},
        "data": {"apply_chat_template_kwargs": {}},
        "env": {"mode": "task", "max_turns": 2, "eval_subset_size": 2, "feedback_size": 1, "num_workers": 1,
                "executor": {"base_url": server.base_url, "model": server.model, "max_tokens": 48},
                "data_dir": str(data_dir), "actor_timeout_s": 600.0, "workdir": str(workdir), **env},
    })


def run_episode(config, server_manager, tokenizer, sampling_params, **kwargs):
    """Build the loop inside the running event loop (as verl's worker does) and run one episode."""

    async def go():
        return await make_loop(config, server_manager, tokenizer).run(sampling_params, **kwargs)

    return asyncio.run(go())


def make_loop(config, server_manager, tokenizer):
    """Instantiate the loop the way verl's AgentLoopWorker does, from our registration YAML."""
    from verl.experimental.agent_loop.agent_loop import DictConfigWrap, ToolListWrap
    from verl.utils.dataset.rl_dataset import RLHFDataset

    entries = yaml.safe_load(open("configs/agent_loop.yaml"))
    entry = next(e for e in entries if e["name"] == "aflow_agent")
    return hydra.utils.instantiate(
        config={"_target_": entry["_target_"]}, trainer_config=DictConfigWrap(config=config),
        server_manager=server_manager, tokenizer=tokenizer, processor=None, hf_model_type="llama",
        dataset_cls=RLHFDataset, data_config=DictConfigWrap(config.data), tools=ToolListWrap([]))


class ScriptedPolicy:
    """verl's server_manager contract, answering with fixed texts (tokenized by the real tokenizer),
    with log-probs from the real CPU backend's model: the policy side is exercised for real,
    the *choice* of text is scripted so the environment's reactions can be checked."""

    def __init__(self, backend, tokenizer, texts, on_call=None):
        self.backend, self.tokenizer, self.texts, self.on_call, self.calls = backend, tokenizer, list(texts), on_call, 0

    async def generate(self, request_id, *, prompt_ids, sampling_params, **kwargs):
        from verl.workers.rollout.replica import TokenOutput

        self.calls += 1
        if self.on_call:
            await self.on_call(self.calls)
        if not self.texts:
            return await self.backend.generate(request_id, prompt_ids=prompt_ids, sampling_params=sampling_params)
        ids = self.tokenizer.encode(self.texts.pop(0), add_special_tokens=False) + [self.tokenizer.eos_token_id]
        return TokenOutput(token_ids=ids, log_probs=[-1.0] * len(ids))




def row(uid="u-1"):
    return {"raw_prompt": [{"role": "user", "content": "Improve the workflow for gsm8k"}],
            "extra_info": {"benchmark": "gsm8k", "index": 0}, "data_source": "aflow/gsm8k",
            "reward_model": {"style": "rule", "ground_truth": "{}"}, "index": 0, "uid": uid}


def test_an_over_long_first_observation_fails_the_episode_instead_of_being_cut(ray_cluster, embedded_executor,
                                                                              data_dir, tmp_path, policy):
    """Issue 13, defect 7: verl left-truncates a prompt over data.max_prompt_length without a word;
    the loop measures the real first observation and fails the episode, saying why."""
    model, tokenizer = policy
    config = trainer_config(embedded_executor, data_dir, tmp_path, mode="query")
    config.actor_rollout_ref.rollout.prompt_length = 64  # any AFlow observation is longer
    server = ScriptedPolicy(None, tokenizer, [action(1)])
    problem = {"raw_prompt": [{"role": "user", "content": "x"}],
               "extra_info": {"benchmark": "gsm8k", "index": 0, "inputs": {"problem": "What is 2 + 3?"}},
               "data_source": "aflow/gsm8k", "reward_model": {"style": "rule", "ground_truth": '{"answer": "5"}'},
               "index": 0, "uid": uuid.uuid4().hex}
    out = run_episode(config, server, tokenizer, {"temperature": 1.0, "max_tokens": 64}, **problem)
    reason = out.extra_fields["episode_failed"]
    assert "more than data.max_prompt_length=64" in reason and "the first observation is" in reason
    assert server.calls == 0  # nothing was generated from a cut prompt
    assert out.reward_score == -0.1 and out.response_mask == [0]  # the default format penalty


def test_episode_masks_rewards_and_turns(ray_cluster, embedded_executor, data_dir, tmp_path, policy):
    from agent_system.agent_loop.cpu_server import CPUServerManager

    model, tokenizer = policy
    config = trainer_config(embedded_executor, data_dir, tmp_path)
    backend = CPUServerManager(config, model=model, tokenizer=tokenizer, base_seed=0)
    server = ScriptedPolicy(backend, tokenizer, ["I am not sure what to do.", action(1)])
    out = run_episode(config, server, tokenizer, {"temperature": 1.0, "top_p": 1.0, "max_tokens": 256},
                      **row(uuid.uuid4().hex))
    extra = out.extra_fields
    assert extra["episode_failed"] == ""
    assert len(out.response_ids) == len(out.response_mask) > 0
    spans = extra["turn_spans"]
    assert len(spans) == 2 and len(extra["anchors"]) == 2 and len(extra["step_rewards"]) == 2
    generated = [tokenizer.encode(t, add_special_tokens=False) for t in ("I am not sure what to do.", action(1))]
    for (start, end), ids in zip(spans, generated, strict=True):
        assert out.response_mask[start:end] == [1] * (end - start)  # the policy's own tokens
        assert out.response_ids[start:start + len(ids)] == ids
    between = out.response_mask[spans[0][1]:spans[1][0]]
    assert between and set(between) == {0}  # the environment's reply is masked out
    assert sum(out.response_mask) == sum(e - s for s, e in spans)
    assert out.response_logprobs is not None and len(out.response_logprobs) == len(out.response_mask)
    # reward: the first answer was invalid (format penalty 0.1), the second scored a change
    assert extra["anchors"][0] == extra["anchors"][1]  # the invalid turn did not move the state
    assert out.reward_score == pytest.approx(sum(extra["step_rewards"]) - 0.1)
    assert extra["reward_components"]["format"] == pytest.approx(-0.1)
    assert extra["step_penalties"] == [pytest.approx(0.1), 0.0]  # charged at the invalid turn (GiGPO)
    assert out.num_turns == 4  # user, assistant, user (environment), assistant


def test_real_generation_runs_an_episode(ray_cluster, embedded_executor, data_dir, tmp_path, policy):
    """No script: SmolLM2 itself writes both turns through the CPU backend."""
    from agent_system.agent_loop.cpu_server import CPUServerManager

    model, tokenizer = policy
    config = trainer_config(embedded_executor, data_dir, tmp_path, max_turns=2)
    backend = CPUServerManager(config, model=model, tokenizer=tokenizer, base_seed=1)
    calls = []  # (the prompt the policy was given, what it generated), in order

    class Recording:  # the real backend, watched: nothing is scripted
        async def generate(self, request_id, *, prompt_ids, sampling_params, **kwargs):
            output = await backend.generate(request_id, prompt_ids=prompt_ids, sampling_params=sampling_params)
            calls.append((list(prompt_ids), output))
            return output

    out = run_episode(config, Recording(), tokenizer,
                      {"temperature": 1.0, "top_p": 1.0, "max_tokens": 48, "logprobs": True}, **row(uuid.uuid4().hex))
    extra = out.extra_fields
    assert extra["episode_failed"] == ""
    spans = extra["turn_spans"]
    # task mode runs max_turns turns: one span, anchor, step reward and penalty per generation
    assert len(calls) == len(spans) == 2
    assert len(extra["anchors"]) == len(extra["step_rewards"]) == len(extra["step_penalties"]) == 2
    assert out.num_turns == 4  # user, assistant, user (environment), assistant
    assert len(out.response_ids) == len(out.response_mask) == len(out.response_logprobs)
    # each turn's tokens are exactly what SmolLM2 generated, trained on (mask 1) with its own log-probs
    for (start, end), (_, output) in zip(spans, calls, strict=True):
        assert 0 < len(output.token_ids) <= 48 and end - start == len(output.token_ids)
        assert out.response_ids[start:end] == output.token_ids
        assert out.response_mask[start:end] == [1] * (end - start)
        assert out.response_logprobs[start:end] == pytest.approx(output.log_probs)
        assert all(math.isfinite(lp) and lp <= 0 for lp in output.log_probs)
    # the response opens with the first turn and closes with the last; the environment's reply between turns
    # is masked 0, with log-prob 0; the policy saw exactly the context the trainer gets
    assert spans[0][0] == 0 and spans[-1][1] == len(out.response_mask)
    policy_tokens = {i for start, end in spans for i in range(start, end)}
    for i, (m, lp) in enumerate(zip(out.response_mask, out.response_logprobs, strict=True)):
        if i not in policy_tokens:
            assert (m, lp) == (0, 0.0), i
    assert spans[0][1] < spans[1][0]  # the observation is there
    assert calls[0][0] == out.prompt_ids
    assert calls[1][0] == out.prompt_ids + out.response_ids[:spans[1][0]]
    # reward: the sum of the step rewards less the format penalty of each invalid turn, as recorded
    penalties, rewards = extra["step_penalties"], extra["step_rewards"]
    assert set(penalties) <= {0.0, 0.1}
    assert all(r == 0.0 for r, p in zip(rewards, penalties, strict=True) if p)  # an invalid turn earns nothing
    assert extra["reward_components"] == {"return": pytest.approx(sum(rewards)),
                                          "format": pytest.approx(-sum(penalties)), "cost": 0.0, "tokens": 0.0,
                                          "variety": 0.0}
    assert out.reward_score == pytest.approx(sum(rewards) - sum(penalties))
    if penalties[0]:
        assert extra["anchors"][1] == extra["anchors"][0]  # an invalid turn does not move the state


def test_killed_worker_fails_the_episode_without_hanging(ray_cluster, embedded_executor, data_dir, tmp_path, policy):
    import ray

    from agent_system.agent_loop.aflow_agent_loop import env_config_of
    from agent_system.agent_loop.cpu_server import CPUServerManager
    from agent_system.environments.env_package.aflow.worker import NAMESPACE, worker_name

    model, tokenizer = policy
    # A timeout far above the bound below: the reset (which scores the initial workflow with the real
    # executor) may be slow on a busy machine, and only the timeout could end a wait on the dead worker.
    config = trainer_config(embedded_executor, data_dir, tmp_path, num_workers=1, actor_timeout_s=600.0)
    killed_at = []

    async def kill_on_second_turn(call):
        if call == 2:
            name = worker_name(0, env_config_of(config))
            ray.kill(ray.get_actor(name, namespace=NAMESPACE), no_restart=True)
            killed_at.append(time.monotonic())

    backend = CPUServerManager(config, model=model, tokenizer=tokenizer, base_seed=0)
    server = ScriptedPolicy(backend, tokenizer, ["first try", "second try"], on_call=kill_on_second_turn)
    out = run_episode(config, server, tokenizer, {"temperature": 1.0, "max_tokens": 32, "logprobs": True}, **row(uuid.uuid4().hex))
    assert len(killed_at) == 1 and time.monotonic() - killed_at[0] < 60  # noticed at once, not at the 600 s timeout
    assert "step failed" in out.extra_fields["episode_failed"]
    assert "Actor" in out.extra_fields["episode_failed"] or "actor" in out.extra_fields["episode_failed"]
    # a failure is never worth more than an invalid answer, and its tokens teach nothing
    assert out.reward_score == -EnvConfig.from_dict(env_config_of(config)).reward.format_penalty < 0
    assert sum(out.response_mask) == 0 and len(out.response_mask) > 0
    # the next episode gets a fresh worker (the named actor is created again)
    server2 = ScriptedPolicy(backend, tokenizer, [action(7)])
    out2 = run_episode(config, server2, tokenizer, {"temperature": 1.0, "max_tokens": 32, "logprobs": True}, **row(uuid.uuid4().hex))
    assert out2.extra_fields["episode_failed"] == ""
