"""`AFlowAgentLoop`: one AFlow episode per parquet row, as one sequence for verl's classic trainer.

Each turn the policy generates through verl's `server_manager` (vLLM on GPUs, the CPU
backend here), the text goes to the row's `AFlowWorker`, and the environment's reply is
appended as a user message whose tokens are masked 0. The output carries the episode
reward (so verl skips reward workers) and, for workflow-GiGPO, each turn's token span,
anchor state and step reward in `extra_fields`. A worker that dies or times out ends the
episode as failed with the reason; the trainer gets an output either way and never hangs, with
the episode's tokens masked and the reward of one invalid answer (`_failed_reward`). A worker found dead
at reset (killed during an earlier step) is created again, once, and continues from its saved search.

With `env.action_space: canvas` on the CPU rollout (`rollout.name: cpu`) decoding is constrained to the
canvas action grammar of the benchmark's family (`aflow_grammar`, `agent_system.constrained`), so every
action that ends within the token budget parses. The environment then gets exactly the characters the
grammar walked (`TokenConstraint.text`), and `extra_fields` carry `constraint_grammar` and
`constraint_states` (the grammar state before each response token, -1 on environment tokens) for the
trainer's constrained log-probs (`agent_system.verl_cpu.constrained_engine`). Other rollouts (vLLM) do
not know the key, so there the canvas actions are sampled unconstrained and both fields stay empty.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from typing import Any
from uuid import uuid4

from omegaconf import DictConfig, OmegaConf
from verl.experimental.agent_loop.agent_loop import AgentLoopBase, AgentLoopMetrics, AgentLoopOutput, register

from aflow.search.projection import REJECTION_KINDS, rejection_kind
from agent_system.config import EnvConfig
from agent_system.constrained import grammar_name, token_constraint
from agent_system.environments.env_package.aflow.manager import AFlowEnvironmentManager
from agent_system.environments.env_package.aflow.worker import forget_worker, route, worker_handle
from agent_system.reward import episode_reward, operators_used, step_penalty

logger = logging.getLogger(__name__)


def env_config_of(config: Any) -> dict:
    section = config.get("env") if hasattr(config, "get") else None
    if section is None:
        return {}
    return OmegaConf.to_container(section, resolve=True) if isinstance(section, DictConfig) else dict(section)


class ObservationTooLong(ValueError):
    def __init__(self, tokens: int):
        super().__init__(f"{tokens} tokens")
        self.tokens = tokens


@register("aflow_agent")
class AFlowAgentLoop(AgentLoopBase):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.env_dict = env_config_of(self.config)
        self.env_cfg = EnvConfig.from_dict(self.env_dict)
        self.response_length = self.rollout_config.response_length
        self.actor_timeout = self.env_cfg.actor_timeout_s

    def _grammar(self, benchmark: str) -> str:
        """The grammar to decode with ("" for none): canvas actions, on the one rollout that constrains."""
        if self.env_cfg.action_space != "canvas" or getattr(self.rollout_config, "name", None) != "cpu":
            return ""
        from aflow.benchmarks import get_benchmark

        return grammar_name(get_benchmark(benchmark).is_code)

    def _cap_text_prompt_length(self, prompt_ids: list[int]) -> list[int]:
        """verl's hook on the first prompt: it cuts an over-long one from the left with a log warning.
        An AFlow observation cut that way loses its instructions, so the episode fails instead and
        says why (run catches this)."""
        if len(prompt_ids) > self.rollout_config.prompt_length:
            raise ObservationTooLong(len(prompt_ids))
        return prompt_ids

    async def _call(self, ref):
        return await asyncio.wait_for(ref, timeout=self.actor_timeout)

    async def run(self, sampling_params: dict[str, Any], **kwargs) -> AgentLoopOutput:
        started = time.monotonic()
        row = {k: kwargs.get(k) for k in ("extra_info", "reward_model", "data_source", "index")}
        row["extra_info"] = dict(row["extra_info"] or {})
        uid = str(kwargs.get("uid") or uuid4())
        benchmark = row["extra_info"].get("benchmark") or str(row.get("data_source") or "").split("/")[-1]
        episode_id = uuid4().hex
        manager = AFlowEnvironmentManager(self.env_cfg.history_length)
        failed: str | None = None
        for attempt in (1, 2):
            worker = worker_handle(route(self.env_cfg, benchmark, uid), self.env_dict)
            try:
                reset = await self._call(worker.reset.remote(episode_id, uid, row))
                break
            except Exception as exc:  # a dead, hung or misconfigured worker fails this episode only
                forget_worker(worker)
                if attempt == 1 and _actor_died(exc):
                    continue  # killed before this episode began (e.g. by an earlier step): a new one takes over
                return self._failed_output(list(kwargs["raw_prompt"]), f"reset failed: {_reason(exc)}",
                                           sampling_params)

        messages = [manager.user_message(reset["observation"])]
        try:
            prompt_ids = await self.ct_build_initial_tokens(messages)
        except ObservationTooLong as exc:
            reason = (f"the first observation is {exc.tokens} tokens, more than data.max_prompt_length="
                      f"{self.rollout_config.prompt_length}: raise it (task mode) or rebuild the data (query-mode "
                      "prompts are the observation, so filter_overlong_prompts drops them)")
            with contextlib.suppress(Exception):
                await self._call(worker.close.remote(episode_id, reason))
            return self._failed_output(list(kwargs["raw_prompt"]), reason, sampling_params)
        response_mask: list[int] = []
        logprobs: list[float] = []
        grammar = self._grammar(benchmark)
        constraint = token_constraint(self.tokenizer, grammar) if grammar else None
        if constraint is not None:
            sampling_params = {**sampling_params, "aflow_grammar": grammar}
        states: list[int] = []  # per response token: the grammar state before it, -1 when unconstrained
        spans, anchors, step_rewards, penalties = [], [], [], []
        rejections: list[str] = []  # why the environment rejected a turn's action
        generate_s = env_s = 0.0
        for _ in range(self.env_cfg.max_turns):
            t0 = time.monotonic()
            output = await self.server_manager.generate(request_id=uuid4().hex, prompt_ids=prompt_ids,
                                                        sampling_params=sampling_params)
            generate_s += time.monotonic() - t0
            start = len(response_mask)
            mask_before = response_mask
            merged, response_mask, merged_logprobs = await self.ct_merge_assistant_token(
                prompt_ids, output.token_ids, response_mask, logprobs if (logprobs or output.log_probs) else None,
                assistant_logprobs=output.log_probs or None)
            prompt_ids = merged.token_ids
            logprobs = merged_logprobs or []
            spans.append([start, len(response_mask)])
            if constraint is not None:
                text = constraint.text(output.token_ids)
                states = self._align_states(merged, mask_before, states, constraint.states(output.token_ids))
            else:
                text = self.tokenizer.decode(output.token_ids, skip_special_tokens=True)
            messages.append({"role": "assistant", "content": text})
            t0 = time.monotonic()
            try:
                step = await self._call(worker.step.remote(episode_id, text))
            except Exception as exc:  # the environment failed mid-episode
                forget_worker(worker)
                failed = f"step failed: {_reason(exc)}"
                anchors.append("")
                step_rewards.append(0.0)
                penalties.append(0.0)
                break
            finally:
                env_s += time.monotonic() - t0
            anchors.append(step["info"]["anchor"])
            step_rewards.append(float(step["reward"]))
            penalties.append(step_penalty(step["info"], self.env_cfg.reward))
            if not step["info"].get("valid"):
                rejections.append(str(step["info"].get("reason", "")))
            manager.record(text, step["reward"], step["info"])
            if step["done"] or len(response_mask) >= self.response_length:
                break
            previous = list(messages)
            messages.append(manager.user_message(step["observation"]))
            mask_before = response_mask
            merged, response_mask, merged_logprobs = await self.ct_merge_context_msg(
                previous, messages, prompt_ids, response_mask, logprobs or None)
            if constraint is not None:
                states = self._align_states(merged, mask_before, states)
            prompt_ids = merged.token_ids
            logprobs = merged_logprobs or []
            if len(response_mask) >= self.response_length:
                break

        try:
            summary = await self._call(worker.close.remote(episode_id, failed))
        except Exception as exc:
            failed = failed or f"close failed: {_reason(exc)}"
            summary = {}
        if failed:
            reward, components = self._failed_reward(), {"return": 0.0}
            response_mask = [0] * len(response_mask)  # its score is unknown: no gradient from its tokens
        else:
            reward, components = episode_reward(summary, self.env_cfg.reward)
        n = len(response_mask)
        response_ids = prompt_ids[-n:] if n else []
        prefix = prompt_ids[: len(prompt_ids) - n]
        return AgentLoopOutput(
            prompt_ids=prefix,
            response_ids=response_ids[: self.response_length],
            response_mask=response_mask[: self.response_length],
            response_logprobs=logprobs[: self.response_length] if logprobs else None,
            reward_score=float(reward),
            num_turns=len(messages),
            metrics=AgentLoopMetrics(generate_sequences=generate_s, tool_calls=env_s),
            extra_fields={
                "turn_spans": [[a, min(b, self.response_length)] for a, b in spans if a < self.response_length],
                "anchors": anchors[: len(spans)],
                "step_rewards": step_rewards[: len(spans)],
                "step_penalties": penalties[: len(spans)],
                "episode_failed": failed or "",
                "reward_components": components,
                "final_operators": sorted(operators_used(summary.get("final_graph", ""))),
                "episode_seconds": time.monotonic() - started,
                "constraint_grammar": grammar,
                "constraint_states": states[: self.response_length],
                "reward_extra_info": episode_info(components, penalties, failed, rejections),
            },
        )

    def _failed_reward(self) -> float:
        """The reward of an episode the environment failed (a dead or hung worker, an over-long observation).

        Its tokens are masked, so it gets no gradient itself; its reward still sits in its GRPO group's mean
        and std. At 0 it would outrank a format-penalised answer (-format_penalty): if some output could make
        the worker fail, the group's other answers would look worse next to it. At -format_penalty a failure
        is never worth more than one invalid answer."""
        return -abs(self.env_cfg.reward.format_penalty)

    def _align_states(self, merged, mask_before: list[int], states: list[int],
                      assistant_states: list[int] | None = None) -> list[int]:
        """`states` after a Continuous Token merge, edited exactly as verl edits the log-probs (trimmed
        prefix tokens dropped, inserted and context tokens unconstrained), by running verl's own alignment
        on the states shifted by one (its filler 0 then means -1)."""
        _, shifted = self.continuous_token_builder.align_response_metadata(
            merged, mask_before, [s + 1 for s in states],
            assistant_logprobs=None if assistant_states is None else [s + 1 for s in assistant_states])
        return [int(s) - 1 for s in shifted]

    def _failed_output(self, messages: list[dict], reason: str, sampling_params: dict) -> AgentLoopOutput:
        """An episode the environment could not start: the seed prompt, one masked token, the failure reward.

        When the rollout returns log-probs (`sampling_params["logprobs"]`, from rollout.calculate_log_probs),
        it carries one (0.0, masked) too: verl concatenates every output's log-probs when the batch's first
        output has them, and one output without crashed the whole step (found by the rehearsal, when a killed
        AFlow worker failed some episodes of a step)."""
        logger.warning("AFlow episode failed: %s", reason)
        prompt_ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if not isinstance(prompt_ids, list):
            prompt_ids = list(prompt_ids["input_ids"])
        filler = self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else 0
        return AgentLoopOutput(
            prompt_ids=prompt_ids[-self.rollout_config.prompt_length:], response_ids=[filler], response_mask=[0],
            response_logprobs=[0.0] if sampling_params.get("logprobs") else None,
            reward_score=self._failed_reward(), num_turns=1, metrics=AgentLoopMetrics(),
            extra_fields={"turn_spans": [], "anchors": [], "step_rewards": [], "step_penalties": [],
                          "episode_failed": reason,
                          "reward_components": {"return": 0.0}, "final_operators": [], "episode_seconds": 0.0,
                          "constraint_grammar": "", "constraint_states": [],
                          "reward_extra_info": episode_info({"return": 0.0}, [], reason)},
        )


def episode_info(components: dict, penalties: list[float], failed: str | None,
                 rejections: list[str] = ()) -> dict[str, float]:
    """Per-episode numbers verl carries as `reward_extra_info`: it logs their means (validation included,
    `val-aux/...`) and writes them into `trainer.validation_data_dir` dumps. `episode_return` is the score
    the episode's workflows earned, before any shaping or penalty (query mode: the final workflow's score);
    `valid_actions` the share of the policy's turns the environment accepted; `failed_episodes` 1 for an
    episode the environment failed. Every output carries the same keys (verl takes them from the first).
    verl averages them with np.mean, so a failed episode counts 0 (not NaN, which would turn the whole
    validation metric NaN); `failed_episodes` says how many there were (its mean is their share; the name
    differs from the extra field `episode_failed`, the reason, which verl puts in the same batch).
    `rejected_<kind>`: the share of the episode's turns rejected for that kind of reason
    (`aflow.search.projection.REJECTION_KINDS`, e.g. editing the rounds of a step that has none), so training
    and validation both say why actions fail, not only how often."""
    turns = len(penalties)
    kinds = Counter(rejection_kind(r) for r in rejections)
    return {"episode_return": 0.0 if failed else float(components.get("return", 0.0)),
            "valid_actions": 0.0 if failed or not penalties else sum(p == 0 for p in penalties) / len(penalties),
            "failed_episodes": 1.0 if failed else 0.0,
            **{f"rejected_{kind}": kinds[kind] / turns if turns and not failed else 0.0 for kind in (*REJECTION_KINDS, "other")}}


def _actor_died(exc: BaseException) -> bool:
    import ray

    return isinstance(exc, ray.exceptions.RayActorError)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, asyncio.TimeoutError):
        return "the environment worker did not answer in time"
    cause = getattr(exc, "cause", None)  # a RayTaskError: the worker's own exception, not Ray's header line
    if isinstance(cause, BaseException):
        exc = cause
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300] if text else ''}"
