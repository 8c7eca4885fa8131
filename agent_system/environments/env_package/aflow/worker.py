"""`AFlowWorker`: an async Ray actor that owns tasks' search trees, experience and caches.

Routing: in task mode every episode of a benchmark goes to the same worker (one search
tree per benchmark, growing over training, as AFlow's search would); in query mode
episodes are spread by uid. Within a worker, `reset` is keyed by the GRPO uid: every
rollout of one parquet row starts from the same node.

Validation (task mode): rows whose `extra_info.split` is "test" (data_prep writes the val
parquet from AFlow's test splits) are scored on the test split's problems, from the
initial workflow, in a state of their own that is never merged: validation measures how
much the policy improves a fresh workflow on unseen problems, and never grows the
training tree or its experience.

Load: every problem a worker runs holds a sandbox process and executor calls; one
semaphore of `env.concurrency` slots per worker bounds them across all its episodes.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from aflow.benchmarks import Problem, get_benchmark, public_tests, resolve_data_dir
from aflow.config import LLMConfig
from aflow.llm import LLMClient
from aflow.sandbox import Sandbox
from aflow.search.experience import Experience, ExperiencePool
from aflow.search.selection import SelectionConfig, select
from aflow.search.tree import Node, Tree
from agent_system.config import EnvConfig
from agent_system.environments.env_package.aflow.episode import Episode, Outcome, Scored, score_workflow
from agent_system.environments.env_package.aflow.spaces import episode_class, query_episode, start_workflow
from agent_system.reward import QA_BENCHMARKS, make_judge

NAMESPACE = "aflow-rl"


def stable_index(key: str, buckets: int) -> int:
    return int(hashlib.sha256(key.encode()).hexdigest(), 16) % max(1, buckets)


TRAIN_SPLIT, VALIDATION_SPLIT = "validate", "test"  # AFlow's: search on validate, report on test


class TaskState:
    """One benchmark's search in task mode on one split: tree, experience, the fixed problem subset.
    The training split's state grows with every episode; the validation split's never does."""

    def __init__(self, benchmark: str, cfg: EnvConfig, pool: ExperiencePool, split: str = TRAIN_SPLIT):
        self.bench = get_benchmark(benchmark)
        self.split = split
        data_dir = resolve_data_dir(cfg.data_dir)
        self.problems = self.bench.load(split, data_dir, cfg.eval_subset_size)
        self.tests = public_tests(self.bench.name, data_dir) if self.bench.is_code else {}
        self.tree = Tree()
        self.scored: dict[int, Scored] = {}
        self.pool = pool
        self.starts: dict[str, int] = {}  # uid -> round every rollout of that row starts from
        self.rng = np.random.RandomState(cfg.seed)
        self.lock = asyncio.Lock()


class AFlowWorker:
    """Created through `worker_handle`; every public method is a Ray actor method."""

    def __init__(self, env_config: dict, workdir: str | None = None):
        self.cfg = EnvConfig.from_dict(env_config)
        self.workdir = Path(workdir or self.cfg.workdir or os.path.join(tempfile.gettempdir(), "aflow-rl-env"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        if not self.cfg.executor.base_url or not self.cfg.executor.model:
            raise ValueError("env.executor.base_url and env.executor.model must name the executor endpoint")
        self.llm = LLMClient(LLMConfig(base_url=self.cfg.executor.base_url, model=self.cfg.executor.model,
                                       api_key_env=self.cfg.executor.api_key_env,
                                       max_tokens=self.cfg.executor.max_tokens,
                                       cache_path=self.workdir / "llm-cache.sqlite"))
        self.sandbox: Sandbox | None = None
        self.sandbox_lock = asyncio.Lock()  # concurrent first resets must start one zygote, not one each
        self.tasks: dict[tuple[str, str], TaskState] = {}  # (benchmark, split)
        self.episodes: dict[str, Episode] = {}
        self.task_of: dict[str, tuple[str, str]] = {}
        self.slots = asyncio.Semaphore(max(1, self.cfg.concurrency))
        self.judge = None

    async def ping(self) -> int:
        return os.getpid()

    async def _sandbox(self) -> Sandbox:
        async with self.sandbox_lock:
            if self.sandbox is None:
                self.sandbox = await Sandbox().start()
        return self.sandbox

    async def _task(self, benchmark: str, split: str = TRAIN_SPLIT) -> TaskState:
        key = (benchmark, split)
        if key not in self.tasks:
            scope = benchmark if split == TRAIN_SPLIT else f"{benchmark}/{split}"
            if self.cfg.action_space != "code":  # a canvas search's records are canvas edits of its own nodes
                scope = f"{scope}/{self.cfg.action_space}"
            pool = ExperiencePool(self.workdir / "experience.sqlite", scope=scope)
            self.tasks[key] = TaskState(benchmark, self.cfg, pool, split)
        state = self.tasks[key]
        async with state.lock:
            if not state.tree.nodes:  # the root: the initial workflow, scored once
                seed = start_workflow(self.cfg.action_space, state.bench.is_code, self.cfg.initial_workflow)
                scored = await score_workflow(seed, state.problems, state.bench, self.llm, await self._sandbox(),
                                              state.tests, self.cfg.reward.scoring, self.slots)
                state.tree.add(Node(round=1, graph=seed.graph, prompt=seed.prompt, modification="initial workflow",
                                    scores=[scored.score], cost_usd=scored.cost_usd, calls=scored.calls))
                state.scored[1] = scored
        return state

    async def reset(self, episode_id: str, uid: str, row: dict) -> dict:
        extra = row.get("extra_info") or {}
        benchmark = extra.get("benchmark") or str(row.get("data_source", "")).split("/")[-1]
        sandbox = await self._sandbox()
        if self.cfg.mode == "task":
            split = VALIDATION_SPLIT if extra.get("split") == VALIDATION_SPLIT else TRAIN_SPLIT
            state = await self._task(benchmark, split)
            async with state.lock:
                if uid not in state.starts:
                    node, _ = select(state.tree, SelectionConfig(), state.rng)
                    state.starts[uid] = node.round
                start_round = state.starts[uid]
            episode = episode_class(self.cfg.action_space)("task", state.bench, self.llm, sandbox, state.tests, self.cfg.max_turns,
                              state.scored[start_round], start_round, state.pool.of_parent(start_round),
                              state.problems, self.cfg.max_action_chars, scoring=self.cfg.reward.scoring,
                              slots=self.slots)
            self.task_of[episode_id] = (benchmark, split)
        else:
            bench = get_benchmark(benchmark)
            problem = query_problem(row, benchmark)
            tests = public_tests(bench.name, resolve_data_dir(self.cfg.data_dir)) if bench.is_code else {}
            judge = self._judge() if bench.name in QA_BENCHMARKS else None
            episode = query_episode(self.cfg.action_space, bench, problem, self.cfg.initial_workflow, llm=self.llm,
                                    sandbox=sandbox, tests=tests, max_turns=self.cfg.max_turns,
                                    max_action_chars=self.cfg.max_action_chars, judge=judge,
                                    scoring=self.cfg.reward.scoring, slots=self.slots)
        self.episodes[episode_id] = episode
        return {"observation": episode.observation(), "anchor_state": episode.current.graph}

    def _judge(self):
        if self.cfg.reward.judge is None or not self.cfg.reward.judge.base_url:
            return None
        if self.judge is None:
            self.judge = make_judge(self.cfg.reward.judge)
        return self.judge

    async def step(self, episode_id: str, text: str) -> dict:
        episode = self.episodes[episode_id]
        observation, reward, done, info = await episode.step(text)
        return {"observation": observation, "reward": reward, "done": done, "info": info}

    async def close(self, episode_id: str, failed: str | None = None) -> dict:
        """Finish an episode: merge its workflows and experience into the shared state."""
        episode = self.episodes.pop(episode_id, None)
        if episode is None:
            return {}
        outcome = episode.outcome(failed)
        key = self.task_of.pop(episode_id, None)
        if outcome.mode == "task" and key and key[1] == TRAIN_SPLIT and not failed:
            await self._merge(self.tasks[key], outcome)
        return outcome_summary(outcome)

    async def _merge(self, state: TaskState, outcome: Outcome) -> None:
        async with state.lock:
            parent = outcome.start_round
            for modification, scored in outcome.nodes:
                number = max(state.tree.nodes) + 1
                before = state.scored[parent].score
                state.tree.add(Node(round=number, graph=scored.graph, prompt=scored.prompt, parent=parent,
                                    modification=modification, scores=[scored.score], cost_usd=scored.cost_usd,
                                    calls=scored.calls))
                state.scored[number] = scored
                state.pool.add(Experience(parent, number, modification, before, scored.score))
                parent = number

    async def tree_summary(self, benchmark: str, split: str = TRAIN_SPLIT) -> list[dict]:
        state = self.tasks.get((benchmark, split))
        return [n.summary() for n in state.tree.nodes.values()] if state else []

    async def shutdown(self) -> None:
        if self.sandbox is not None:
            await self.sandbox.close()
        await self.llm.close()


def query_problem(row: dict, benchmark: str) -> Problem:
    """The problem of a query-mode row: inputs from extra_info, reference from reward_model."""
    extra = row.get("extra_info") or {}
    inputs = extra.get("inputs")
    inputs = json.loads(inputs) if isinstance(inputs, str) else dict(inputs or {})
    truth = (row.get("reward_model") or {}).get("ground_truth")
    reference = json.loads(truth) if isinstance(truth, str) else dict(truth or {})
    if not inputs.get("problem"):
        raise ValueError(f"query-mode row {extra.get('index')} has no extra_info.inputs.problem")
    return Problem(id=str(extra.get("problem_id", extra.get("index", ""))), inputs=inputs, reference=reference)


def outcome_summary(outcome: Outcome) -> dict[str, Any]:
    return {
        "mode": outcome.mode,
        "turns": [asdict(t) for t in outcome.turns],
        "final_graph": outcome.final_graph,
        "cost_usd": outcome.cost_usd,
        "calls": outcome.calls,
        "failed": outcome.failed,
    }


def worker_name(index: int, env_config: dict, workdir: str | None = None) -> str:
    """Named per config: a job with other env settings never picks up a stale worker."""
    digest = hashlib.sha256(json.dumps([env_config, workdir], sort_keys=True, default=str).encode()).hexdigest()
    return f"aflow-worker-{index}-{digest[:10]}"


# Handles this process owns. A named, non-detached Ray actor lives only while its owner (the process
# that created it) holds a handle: without this registry the worker would die with the first
# episode that created it, under the feet of the episodes still using it. The registry dies with
# the process (a verl agent-loop worker, the local trainer), and the actors with it.
_OWNED: dict[str, Any] = {}


def forget_worker(handle) -> None:
    """Drop a handle whose actor died, so the next episode creates the worker again."""
    for name, owned in list(_OWNED.items()):
        if owned is handle:
            del _OWNED[name]


def release_workers() -> None:
    """Kill every worker this process owns (end of a run, or between tests sharing a cluster:
    live workers hold their CPUs, and a cluster full of idle workers cannot place new ones)."""
    import ray

    for handle in list(_OWNED.values()):
        try:
            ray.kill(handle, no_restart=True)
        except Exception:  # already dead: nothing to release
            pass
    _OWNED.clear()


def worker_handle(index: int, env_config: dict, workdir: str | None = None):
    """The named actor for worker `index`, created on first use with the configured resources."""
    import ray

    name = worker_name(index, env_config, workdir)
    if name in _OWNED:
        return _OWNED[name]
    cfg = EnvConfig.from_dict(env_config)
    resources = dict(cfg.resources_per_worker)
    actor = ray.remote(AFlowWorker).options(
        name=name, namespace=NAMESPACE, get_if_exists=True,
        num_cpus=resources.get("num_cpus", 0.5), num_gpus=resources.get("num_gpus", 0.0), max_concurrency=256,
        max_restarts=0,
    )
    handle = actor.remote(env_config, workdir)
    _OWNED[name] = handle
    return handle


def route(cfg: EnvConfig, benchmark: str, uid: str) -> int:
    """Which worker an episode goes to (see the module docstring)."""
    return stable_index(benchmark if cfg.mode == "task" else uid, cfg.num_workers)
