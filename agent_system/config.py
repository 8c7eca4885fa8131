"""The `env:` section of the training config, as dataclasses with every default in one place.

verl rejects unknown keys under its own sections, so everything the AFlow environment
needs lives under a top-level `env:` key of the hydra config; `EnvConfig.from_dict` reads it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

EMBEDDED_EXECUTOR = "embedded"


@dataclass
class EndpointConfig:
    # The executor: an OpenAI-compatible base URL, or "embedded" for the bundled llama.cpp SmolLM2-135M (CPU),
    # started by the task runner. Empty means embedded too, but only for an embedded policy: a real policy
    # with no executor configured is refused (recipes/checks.py), not silently paired with a 135M executor.
    # As env.reward.judge: empty means no judge.
    base_url: str = ""
    model: str = ""
    api_key_env: str | None = None
    max_tokens: int = 512


@dataclass
class RewardConfig:
    """Episode return plus shaping; every shaping weight is 0 except the format penalty."""

    format_penalty: float = 0.1  # subtracted per invalid (unparseable, rejected or cosmetic) action
    cost_penalty: float = 0.0  # per USD of executor cost in the episode (listed prices only)
    token_penalty: float = 0.0  # per 1,000 executor tokens of the episode's workflows, cache hits included
    # Credit only what the executor made: each scored problem runs again with another problem's executor
    # replies, and a workflow earns max(0, real score - that score) (agent_system/.../aflow/measure.py).
    # Off: a constant answer, a memorised one or the policy's own answer to a shown problem scores.
    counterfactual: bool = True
    variety_weight: float = 0.0  # bonus per distinct operator used by the final workflow (WA-GRPO)
    diversity_weight: float = 0.0  # bonus for differing from the other workflows of the group (WA-GRPO)
    # optional LLM judge for QA answers (query mode), off while its base_url is empty; a plain section (not
    # Optional) so that `env.reward.judge.base_url=... env.reward.judge.model=...` work on the command line
    judge: EndpointConfig = field(default_factory=EndpointConfig)
    # How workflow outputs are scored (aflow.benchmarks.SCORING_VARIANTS). `reward`: hardened rules, e.g.
    # a QA answer that hedges ("A or B", "yes no") or stuffs words scores 0; `aflow`: AFlow's own rules.
    scoring: str = "reward"


@dataclass
class HealthConfig:
    """When to stop a run that is training on nothing (recipes/health.py): with a checkpoint and one line.
    A step is *failing* when more than `max_failed_share` of its episodes failed (no reward: masked), and
    *flat* when no GRPO group has a reward spread (no gradient from the reward). The run stops after
    `failed_steps` failing steps in a row, or `flat_steps` flat steps in a row; 0 turns a check off."""

    max_failed_share: float = 0.5
    failed_steps: int = 3
    flat_steps: int = 10


@dataclass
class GiGPOConfig:
    step_advantage_w: float = 1.0
    gamma: float = 0.95
    epsilon: float = 1e-6


@dataclass
class EnvConfig:
    mode: str = "task"  # "task": a multi-turn AFlow optimization episode; "query": one problem per episode
    # "code": each action is a whole workflow (graph.py + prompt.py); "canvas": one line of the canvas action
    # language (aflow.canvas), edits of a workflow that starts at aflow.canvas.initial (so initial_workflow is
    # not used). The agent loop's constrained decoding reads it too.
    action_space: str = "code"
    max_turns: int = 3
    # Task mode: each step is scored on a fresh sample of this many problems of the split's scoring pool,
    # the proposal and the workflow it modifies on the same sample; the policy never sees those problems
    eval_subset_size: int = 20
    feedback_size: int = 3  # task mode: the problems whose failures the observation shows (never scored)
    history_length: int = 2  # past turns shown in the observation
    num_workers: int = 4  # AFlowWorker actors
    resources_per_worker: dict[str, float] = field(default_factory=lambda: {"num_cpus": 0.5, "num_gpus": 0.0})
    executor: EndpointConfig = field(default_factory=EndpointConfig)
    data_dir: str | None = None  # AFlow JSONL directory on the workers' machines
    # The workers' state: search trees, experience pools, response cache. recipes/train.py makes it
    # <trainer.default_local_dir>/env, the run's own, saved with each checkpoint (recipes/env_state.py);
    # unset outside a training run: a temp dir
    workdir: str | None = None
    concurrency: int = 8  # problems evaluated at once inside one worker
    # Budgets of one workflow, charged to it (a spent budget fails that workflow's problems, nobody else's):
    workflow_concurrency: int = 4  # problems of one measurement at once (so no workflow holds every slot)
    workflow_time_budget_s: float = 1200.0  # sandbox seconds of one measurement, summed over its problems
    problem_time_limit_s: float = 300.0  # wall time of one problem's run
    max_calls_per_run: int = 40  # executor requests of one problem's run, cache hits included
    max_tokens_per_run: int = 40_000  # their prompt + completion tokens
    # The k-th repeat of a request within one run (an ensemble's members) is sampled at this temperature
    # with seed k (both in the cache key): independent samples, not one cached answer k times
    sample_temperature: float = 0.7
    run_id: str | None = None  # names this run's experience records (default: one per worker process)
    # Train even where the sandbox gets no file confinement (no private root, no Landlock): the answers
    # could then read the references. Off: training refuses to start, naming the missing layers.
    allow_weak_isolation: bool = False
    initial_workflow: str = "builtin:io"  # action_space "code" only
    max_action_chars: int = 20_000
    actor_timeout_s: float = 1800.0  # a reset may first score the initial workflow on the whole subset
    seed: int = 0
    reward: RewardConfig = field(default_factory=RewardConfig)
    gigpo: GiGPOConfig = field(default_factory=GiGPOConfig)
    health: HealthConfig = field(default_factory=HealthConfig)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> EnvConfig:
        """Build from the (OmegaConf-resolved) `env:` mapping; unknown keys are an error."""
        return _build(cls, dict(data or {}), "env")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


ACTION_SPACES = ("code", "canvas")
NESTED = {"executor": EndpointConfig, "reward": RewardConfig, "gigpo": GiGPOConfig, "judge": EndpointConfig,
          "health": HealthConfig}


def _build(cls, data: dict, where: str):
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown key(s) in {where}: {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    values = {}
    for name, value in data.items():
        if name in NESTED and isinstance(value, dict):
            value = _build(NESTED[name], dict(value), f"{where}.{name}")
        values[name] = value
    config = cls(**values)
    if isinstance(config, EnvConfig) and config.mode not in ("task", "query"):
        raise ValueError(f"env.mode must be 'task' or 'query', not {config.mode!r}")
    if isinstance(config, EnvConfig) and config.action_space not in ACTION_SPACES:
        raise ValueError(f"env.action_space must be 'code' or 'canvas', not {config.action_space!r}")
    if isinstance(config, RewardConfig):
        from aflow.benchmarks import SCORING_VARIANTS

        if config.scoring not in SCORING_VARIANTS:
            raise ValueError(f"{where}.scoring must be one of {', '.join(SCORING_VARIANTS)}, not {config.scoring!r}")
    return config
