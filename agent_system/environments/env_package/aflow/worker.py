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

Problems (task mode): a split is cut into a feedback set, the only problems the policy sees, and
a scoring pool sampled afresh at every step (draws.py). A node's scores are every measurement of
it on such samples (its own step's, and each later step that started from it), so selection
reads a mean over fresh samples, not one lucky draw. Workflows that differ only cosmetically are
one node (aflow.workflows.identity).

State: a training split's search (tree, measurements, the selection's random state) is written to
`<workdir>/search/<benchmark>.pkl` after every merge and read back when the worker starts again; with the
experience pool and the response cache in the same directory, the directory is the environment's whole
state, which training saves with each checkpoint (recipes/env_state.py). Validation states are not
kept: they never grow, and the response cache makes measuring their root again free.

Load: every problem a worker runs holds a sandbox process and executor calls; one semaphore of
`env.concurrency` slots per worker bounds them across all its episodes, and each measurement
holds at most `env.workflow_concurrency` of them within its own time budget (measure.py).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import pickle
import tempfile
import uuid
from collections import deque
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np

from aflow.benchmarks import Problem, get_benchmark, public_tests, resolve_data_dir
from aflow.benchmarks.weak_tests import is_weak
from aflow.config import LLMConfig
from aflow.llm import LLMClient
from aflow.sandbox import Sandbox, isolation_report, missing_file_confinement
from aflow.search.experience import Experience, ExperiencePool
from aflow.search.selection import SelectionConfig, select
from aflow.search.tree import Node, Tree
from aflow.workflows import WorkflowCode
from agent_system.config import EnvConfig
from agent_system.environments.env_package.aflow.draws import Draws
from agent_system.environments.env_package.aflow.episode import Baselines, Episode, Outcome
from agent_system.environments.env_package.aflow.measure import Meter, Scored, measure
from agent_system.environments.env_package.aflow.spaces import episode_class, query_episode, start_workflow
from agent_system.reward import QA_BENCHMARKS, make_judge

NAMESPACE = "aflow-rl"


def stable_index(key: str, buckets: int) -> int:
    return int(hashlib.sha256(key.encode()).hexdigest(), 16) % max(1, buckets)


TRAIN_SPLIT, VALIDATION_SPLIT = "validate", "test"  # AFlow's: search on validate, report on test


class TaskState:
    """One benchmark's search in task mode on one split: tree, experience, its feedback set and scoring pool.
    The training split's state grows with every episode; the validation split's never does."""

    def __init__(self, benchmark: str, cfg: EnvConfig, pool: ExperiencePool, meter: Meter, split: str = TRAIN_SPLIT):
        self.bench = get_benchmark(benchmark)
        self.split = split
        data_dir = resolve_data_dir(cfg.data_dir)
        problems = self.bench.load(split, data_dir)
        if cfg.reward.scoring == "reward":  # no answer to these can earn a reward (aflow.benchmarks.weak_tests)
            problems = [p for p in problems if not is_weak(self.bench.name, p.id)]
        self.draws = Draws(problems, cfg.eval_subset_size, cfg.feedback_size, cfg.seed)
        tests = public_tests(self.bench.name, data_dir) if self.bench.is_code else {}
        self.meter = meter.bound(self.bench, tests, meter.sandbox)
        self.tree = Tree()
        self.scored: dict[int, Scored] = {}  # round -> its first measurement (with the feedback failures)
        self.rounds: dict[str, int] = {}  # behaviour hash -> round: cosmetic variants are one node
        self.measured: set[tuple[str, str]] = set()  # (hash, sample) measurements already in a node's scores
        self.baselines = Baselines()
        self.pool = pool
        self.starts: dict[str, int] = {}  # uid -> round every rollout of that row starts from
        self.rng = np.random.RandomState(cfg.seed)
        self.lock = asyncio.Lock()

    KEPT = ("tree", "scored", "rounds", "measured")

    def save(self, path: Path) -> None:
        """The search, written atomically (a crash leaves the previous file)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {key: getattr(self, key) for key in self.KEPT}
        state["rng"] = self.rng.get_state()
        staging = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        staging.write_bytes(pickle.dumps(state))
        os.replace(staging, path)

    def load(self, path: Path) -> bool:
        """Continue a saved search (written by `save`, in this run's own directory); False when none."""
        if not path.is_file():
            return False
        state = pickle.loads(path.read_bytes())
        for key in self.KEPT:
            setattr(self, key, state[key])
        self.rng.set_state(state["rng"])
        return True

    def start_of(self, round_: int) -> tuple[Scored, WorkflowCode]:
        """A node as an episode's start: its feedback failures, and its mean over all its measurements."""
        node = self.tree.nodes[round_]
        return (replace(self.scored[round_], score=node.mean),
                WorkflowCode(f"round_{round_}", node.graph, node.prompt))

    def tried_from(self, round_: int, experience: list[Experience]) -> dict[str, str]:
        """Behaviour hashes of the workflows already tried from a node: proposing one again is no new workflow."""
        children = [self.tree.nodes[e.child] for e in experience if e.child in self.tree.nodes]
        return {self.scored[n.round].hash: "a workflow already tried from this node" for n in children}


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
        self.query_bench: dict[str, str] = {}
        self.slots = asyncio.Semaphore(max(1, self.cfg.concurrency))
        self.meter = Meter.of(self.cfg, self.llm, self.slots)
        self.run_id = self.cfg.run_id or uuid.uuid4().hex[:12]  # experience records belong to this run only
        self.decoys: dict[str, deque] = {}  # benchmark -> recent real reply transcripts (query-mode counterfactuals)
        self.judge = None

    async def ping(self) -> int:
        return os.getpid()

    async def _sandbox(self) -> Sandbox:
        async with self.sandbox_lock:
            if self.sandbox is None:
                if not self.cfg.allow_weak_isolation:  # this node's answers must not read its references
                    refuse_weak_isolation(await isolation_report())
                self.sandbox = await Sandbox().start()
        return self.sandbox

    async def _task(self, benchmark: str, split: str = TRAIN_SPLIT) -> TaskState:
        key = (benchmark, split)
        sandbox = await self._sandbox()  # before the check: no await between it and the state's creation
        if key not in self.tasks:
            scope = f"{self.run_id}/{benchmark}" if split == TRAIN_SPLIT else f"{self.run_id}/{benchmark}/{split}"
            if self.cfg.action_space != "code":  # a canvas search's records are canvas edits of its own nodes
                scope = f"{scope}/{self.cfg.action_space}"
            pool = ExperiencePool(self.workdir / "experience.sqlite", scope=scope)
            self.tasks[key] = TaskState(benchmark, self.cfg, pool, replace(self.meter, sandbox=sandbox), split)
            if split == TRAIN_SPLIT:
                self.tasks[key].load(self._state_path(benchmark))
        state = self.tasks[key]
        async with state.lock:
            if not state.tree.nodes:  # the root: the initial workflow, measured once on a sample of its own
                seed = start_workflow(self.cfg.action_space, state.bench.is_code, self.cfg.initial_workflow)
                scored, _ = await measure(seed, state.draws.sample("root", 0), state.meter, state.draws.feedback)
                state.tree.add(Node(round=1, graph=seed.graph, prompt=seed.prompt, modification="initial workflow",
                                    scores=[scored.score], cost_usd=scored.cost_usd, calls=scored.calls))
                state.scored[1] = scored
                state.rounds[scored.hash] = 1
        return state

    def _state_path(self, benchmark: str) -> Path:
        scope = benchmark if self.cfg.action_space == "code" else f"{benchmark}-{self.cfg.action_space}"
        return self.workdir / "search" / f"{scope}.pkl"

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
            start, start_code = state.start_of(start_round)
            experience = state.pool.of_parent(start_round)
            episode = episode_class(self.cfg.action_space)(
                "task", state.meter, self.cfg.max_turns, start, start_code, start_round, experience, state.draws,
                self.cfg.max_action_chars, uid=uid, known=state.tried_from(start_round, experience),
                baselines=state.baselines)
            self.task_of[episode_id] = (benchmark, split)
        else:
            bench = get_benchmark(benchmark)
            problem = query_problem(row, benchmark)
            tests = public_tests(bench.name, resolve_data_dir(self.cfg.data_dir)) if bench.is_code else {}
            judge = self._judge() if bench.name in QA_BENCHMARKS else None
            episode = query_episode(self.cfg.action_space, bench, problem, self.cfg.initial_workflow,
                                    self.meter.bound(bench, tests, sandbox), max_turns=self.cfg.max_turns,
                                    max_action_chars=self.cfg.max_action_chars, judge=judge,
                                    decoys=list(self.decoys.get(bench.name, ())))
            self.query_bench[episode_id] = bench.name
        self.episodes[episode_id] = episode
        return {"observation": episode.observation(), "anchor_state": episode.current.graph}

    def _judge(self):
        if not self.cfg.reward.judge.base_url:
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
            async with self.tasks[key].lock:
                self.tasks[key].save(self._state_path(key[0]))
        bench = self.query_bench.pop(episode_id, None)
        if bench is not None:
            self.decoys.setdefault(bench, deque(maxlen=DECOYS_KEPT)).extend(outcome.transcripts)
        return outcome_summary(outcome)

    async def _merge(self, state: TaskState, outcome: Outcome) -> None:
        """The episode's workflows join the tree (a cosmetic variant of a node adds a measurement to it,
        not a node), then every measurement the episode made of a workflow it started a step from."""
        async with state.lock:
            parent = outcome.start_round
            for (modification, scored), before in zip(outcome.nodes, outcome.befores, strict=True):
                number = state.rounds.get(scored.hash)
                if number is None:
                    number = max(state.tree.nodes) + 1
                    state.tree.add(Node(round=number, graph=scored.graph, prompt=scored.prompt, parent=parent,
                                        modification=modification, scores=[scored.score],
                                        cost_usd=scored.cost_usd, calls=scored.calls))
                    state.scored[number], state.rounds[scored.hash] = scored, number
                    state.pool.add(Experience(parent, number, modification, before, scored.score))
                else:
                    state.tree.nodes[number].scores.append(scored.score)
                parent = number
            for workflow, sample, score in outcome.remeasured:
                number = state.rounds.get(workflow)
                if number is not None and (workflow, sample) not in state.measured:
                    state.measured.add((workflow, sample))
                    state.tree.nodes[number].scores.append(score)

    async def tree_summary(self, benchmark: str, split: str = TRAIN_SPLIT) -> list[dict]:
        state = self.tasks.get((benchmark, split))
        return [n.summary() for n in state.tree.nodes.values()] if state else []

    async def shutdown(self) -> None:
        if self.sandbox is not None:
            await self.sandbox.close()
        await self.llm.close()


DECOYS_KEPT = 64


class WeakIsolation(RuntimeError):
    """The sandbox on this node cannot keep answers from reading its files (one line, the layers named)."""


def refuse_weak_isolation(layers: list[str]) -> None:
    missing = missing_file_confinement(layers)
    if missing:
        raise WeakIsolation(f"the sandbox on this node gets no file confinement ({' and '.join(missing)} missing; "
                            f"it gets {', '.join(layers) or 'nothing'}): answers could read the references, so "
                            "rewards cannot be trusted; run `aflow sandbox-check` on the node, or set "
                            "env.allow_weak_isolation=true to train anyway")


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
        "tokens": outcome.tokens,
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
