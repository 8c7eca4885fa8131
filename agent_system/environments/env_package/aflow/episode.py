"""Episodes over the aflow core, with no Ray in sight: a Gymnasium-like reset/step.

Task mode: the state is a workflow node of the task's search tree; an action is a tagged
modification; the step reward is the change in score on a fixed validation subset. The
episode edits its own snapshot: nothing reaches the shared tree or experience until the
owning worker merges the finished episode, so the n rollouts of a GRPO group are
independent of each other and later resets benefit from all of them.

Query mode: the state is one problem; an action is a whole workflow for it; the reward
is that workflow's score on the problem (the episode ends at the first workflow that runs,
or after max_turns rejected ones).
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import time
from dataclasses import dataclass, field

from aflow.benchmarks import Benchmark, Problem, qa
from aflow.evaluate import run_problem
from aflow.llm import LLMClient
from aflow.sandbox import Sandbox
from aflow.search.experience import Experience
from aflow.search.projection import normalize_modification, project
from aflow.workflows import WorkflowCode
from agent_system.environments.env_package.aflow.prompts import (
    continuation,
    query_observation,
    task_observation,
)
from agent_system.reward import QA_BENCHMARKS


def anchor_of(graph: str, prompt: str) -> str:
    """A hash of the normalized workflow: turns acting on the same workflow share it (GiGPO)."""
    normal = re.sub(r"\s+", " ", graph.strip()) + "\n--\n" + re.sub(r"\s+", " ", prompt.strip())
    return hashlib.sha256(normal.encode()).hexdigest()[:16]


@dataclass
class Scored:
    graph: str
    prompt: str
    score: float
    cost_usd: float = 0.0
    calls: int = 0
    failures: list[dict] = field(default_factory=list)
    outputs: list = field(default_factory=list)  # one per problem, in order


async def score_workflow(workflow: WorkflowCode, problems: list[Problem], bench: Benchmark, llm: LLMClient,
                         sandbox: Sandbox, tests: dict, scoring: str = "reward",
                         slots: asyncio.Semaphore | None = None) -> Scored:
    """Mean score of a workflow on problems, through the core's run_problem (sandbox + scoring),
    under the `scoring` variant: the environment's is `env.reward.scoring`, `reward` by default.
    `slots` bounds the problems run at once across everything that shares it (a worker's
    `env.concurrency`): each holds a sandbox process and executor calls while it runs."""

    async def one(problem: Problem):
        if slots is None:
            return await run_problem(bench, problem, workflow, llm, tests, sandbox, scoring=scoring)
        async with slots:
            return await run_problem(bench, problem, workflow, llm, tests, sandbox, scoring=scoring)

    results = await asyncio.gather(*(one(p) for p in problems))
    records = [r for r, _ in results]
    failures = [{"input": r.input, "output": r.output, "score": r.score, "error": r.error,
                 "score_reason": r.score_reason} for r in records if r.score < 1][:5]
    return Scored(workflow.graph, workflow.prompt, sum(r.score for r in records) / max(1, len(records)),
                  sum(r.cost_usd for r in records), sum(r.calls for r in records), failures,
                  [r.output for r in records])


@dataclass
class Turn:
    anchor: str
    valid: bool
    reward: float
    reason: str = ""
    score: float | None = None
    modification: str = ""


@dataclass
class Outcome:
    """What a finished episode hands back for merging and for the reward."""

    mode: str
    turns: list[Turn]
    start_round: int | None
    nodes: list[tuple[str, Scored]]  # (modification, evaluated workflow), in order
    final_graph: str
    cost_usd: float
    calls: int
    failed: str | None = None  # set when the environment itself failed


class Episode:
    def __init__(self, mode: str, bench: Benchmark, llm: LLMClient, sandbox: Sandbox, tests: dict,
                 max_turns: int, start: Scored, start_round: int | None, experience: list[Experience],
                 problems: list[Problem], max_action_chars: int, judge=None, scoring: str = "reward",
                 slots: asyncio.Semaphore | None = None):
        self.mode, self.bench, self.llm, self.sandbox, self.tests = mode, bench, llm, sandbox, tests
        self.max_turns, self.start_round, self.problems = max_turns, start_round, problems
        self.current = start
        self.experience = experience
        self.tried = {normalize_modification(e.modification) for e in experience}
        self.turns: list[Turn] = []
        self.nodes: list[tuple[str, Scored]] = []
        self.max_action_chars = max_action_chars
        self.judge = judge  # optional async (problem, output) -> score in [0, 1], query mode only
        self.scoring = scoring  # aflow.benchmarks.SCORING_VARIANTS: how workflow outputs are scored
        self.slots = slots  # the worker's bound on problems run at once (env.concurrency)
        self.started = time.monotonic()

    @property
    def done(self) -> bool:
        if self.mode == "query" and any(t.valid for t in self.turns):
            return True
        return len(self.turns) >= self.max_turns

    def observation(self, feedback: str = "") -> str:
        code = self.bench.is_code
        if self.mode == "query":
            return query_observation(self.bench.name, self.problems[0].inputs["problem"], self.current.graph,
                                     self.current.prompt, code, feedback)
        text = task_observation(self.bench.name, self.current.graph, self.current.prompt, self.current.score,
                                self.experience, self.current.failures, code)
        return f"{feedback}\n\n{text}" if feedback else text

    async def step(self, text: str) -> tuple[str, float, bool, dict]:
        if self.done:
            raise RuntimeError("step() on a finished episode")
        anchor = anchor_of(self.current.graph, self.current.prompt)
        action = project(text[: self.max_action_chars + 1] if len(text) > self.max_action_chars else text,
                         self.current.graph, self.current.prompt, self.tried)
        if len(text) > self.max_action_chars:
            action = type(action)(action.modification, "", "", False, f"answer over {self.max_action_chars} characters")
        if not action.is_valid:
            turn = Turn(anchor, False, 0.0, action.reason)
            self.turns.append(turn)
            return self._reply(turn)
        scored = await self._evaluate(action.workflow)
        reward = scored.score if self.mode == "query" else scored.score - self.current.score
        turn = Turn(anchor, True, reward, "", scored.score, action.modification)
        self.turns.append(turn)
        self.nodes.append((action.modification, scored))
        self.tried.add(normalize_modification(action.modification))
        if self.mode == "task":
            self.experience = self.experience + [Experience(-1, -1, action.modification, self.current.score,
                                                            scored.score)]
            self.current = scored
        return self._reply(turn)

    async def _evaluate(self, workflow: WorkflowCode) -> Scored:
        """A workflow's score on the episode's problems (query mode: its one problem, judged if configured)."""
        scored = await score_workflow(workflow, self.problems, self.bench, self.llm, self.sandbox, self.tests,
                                      self.scoring, self.slots)
        if self.mode == "query" and self.judge is not None and scored.outputs and scored.outputs[0] is not None:
            scored.score = await self._judged(scored.score, scored.outputs[0])
        return scored

    async def _judged(self, lexical: float, output) -> float:
        """The judge lifts a lexical score that misses a paraphrase, never lowers it; under `reward`
        scoring the hedge gate (aflow.benchmarks.qa.gate) comes after it and has the last word, so an
        answer that hedges or stuffs words stays at 0 whatever the judge says; it is not even asked,
        since a hedge that contains the right answer is exactly what a judge is apt to accept."""
        problem = self.problems[0]
        if self.scoring == "reward" and self.bench.name in QA_BENCHMARKS and qa.gate(problem, output) is not None:
            return 0.0
        return max(lexical, await self.judge(problem, output))

    def _reply(self, turn: Turn) -> tuple[str, float, bool, dict]:
        """Mid-episode replies are short: the instructions and catalogue are already in context."""
        done = self.done
        observation = "" if done else self._continuation(turn)
        info = {"valid": turn.valid, "reason": turn.reason, "score": turn.score, "anchor": turn.anchor}
        return observation, turn.reward, done, info

    def _continuation(self, turn: Turn) -> str:
        return continuation(turn, self.current, self.mode)

    def outcome(self, failed: str | None = None) -> Outcome:
        return Outcome(self.mode, self.turns, self.start_round, self.nodes, self.current.graph,
                       sum(s.cost_usd for _, s in self.nodes), sum(s.calls for _, s in self.nodes), failed)
