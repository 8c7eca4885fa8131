"""Episodes over the aflow core, with no Ray in sight: a Gymnasium-like reset/step.

Task mode: the state is a workflow node of the task's search tree; an action is a tagged
modification; the step reward is the proposal's credit minus the credit of the workflow it
modifies, both measured on the same fresh sample of problems the policy has never seen
(`draws.Draws`, `measure.measure`). The episode edits its own snapshot: nothing reaches the
shared tree or experience until the owning worker merges the finished episode, so the n
rollouts of a GRPO group are independent of each other and later resets benefit from all of them.

Query mode: the state is one problem; an action is a whole workflow for it; the reward is that
workflow's credit on the problem: its score, unless it scores as well without the executor (the
policy answering the problem itself). The episode ends at the first workflow that runs, or after
max_turns rejected ones.

Both modes reject a proposal that is behaviourally the workflow it modifies, or one already tried
from the start node (`aflow.workflows.identity`): a cosmetic edit is an invalid turn, not a free one.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import time
from dataclasses import dataclass, field

from aflow.benchmarks import Problem, qa
from aflow.search.experience import Experience
from aflow.search.projection import normalize_modification, project
from aflow.workflows import WorkflowCode
from aflow.workflows.identity import behaviour_hash
from agent_system.environments.env_package.aflow.draws import Draws
from agent_system.environments.env_package.aflow.measure import Meter, Scored, measure
from agent_system.environments.env_package.aflow.prompts import (
    continuation,
    query_observation,
    task_observation,
)
from agent_system.reward import QA_BENCHMARKS

SAME_WORKFLOW = ("behaviourally the same workflow as {what} (it differs at most in comments, docstrings, "
                 "whitespace or variable names)")


def anchor_of(graph: str, prompt: str) -> str:
    """A hash of the normalized workflow: turns acting on the same workflow share it (GiGPO)."""
    normal = re.sub(r"\s+", " ", graph.strip()) + "\n--\n" + re.sub(r"\s+", " ", prompt.strip())
    return hashlib.sha256(normal.encode()).hexdigest()[:16]


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
    nodes: list[tuple[str, Scored]]  # (modification, its measurement on its step's sample), in order
    final_graph: str
    cost_usd: float
    calls: int  # executor requests, cache hits included
    tokens: int = 0  # executor tokens, cache hits included
    failed: str | None = None  # set when the environment itself failed
    # (behaviour hash, sample key, credit): the workflows each step started from, measured again on the
    # step's sample; the worker adds them to the nodes' scores (a node's mean is over fresh samples)
    remeasured: list[tuple[str, str, float]] = field(default_factory=list)
    transcripts: list[list[str]] = field(default_factory=list)  # query mode: real executor replies (decoys)
    befores: list[float] = field(default_factory=list)  # task mode: each node's parent on the node's own sample


class Baselines:
    """Measurements of a workflow on a sample, shared by the episodes of a worker: the n rollouts of
    a group start from the same node and meet the same sample, so it is measured once."""

    KEPT = 4096  # measurements remembered (oldest forgotten first): a worker's memory stays bounded

    def __init__(self) -> None:
        self.futures: dict[tuple[str, str], asyncio.Future] = {}

    async def get(self, key: tuple[str, str], make) -> tuple[Scored, bool]:
        """(measurement, whether this call made it)."""
        future = self.futures.get(key)
        if future is not None:
            return await asyncio.shield(future), False
        future = self.futures[key] = asyncio.get_running_loop().create_future()
        for old in [k for k, f in self.futures.items() if f.done()][:max(0, len(self.futures) - self.KEPT)]:
            del self.futures[old]
        try:
            future.set_result(await make())
        except BaseException as exc:
            del self.futures[key]
            future.set_exception(exc)
            future.exception()  # retrieved: a waiter re-raises it, nobody logs it as lost
            raise
        return future.result(), True


class Episode:
    def __init__(self, mode: str, meter: Meter, max_turns: int, start: Scored, start_code: WorkflowCode,
                 start_round: int | None, experience: list[Experience], problems: Draws | list[Problem],
                 max_action_chars: int, judge=None, uid: str = "", known: dict[str, str] | None = None,
                 baselines: Baselines | None = None, decoys: list[list[str]] = ()):
        self.mode, self.meter, self.max_turns, self.start_round = mode, meter, max_turns, start_round
        self.bench = meter.bench
        self.current, self.current_code = start, start_code
        self.experience = experience
        self.tried = {normalize_modification(e.modification) for e in experience}
        # behaviour hash -> what it is: a proposal with one of these hashes is not a new workflow
        self.known = {**(known or {}), start.hash: "the workflow it modifies"}
        self.turns: list[Turn] = []
        self.nodes: list[tuple[str, Scored]] = []
        self.remeasured: list[tuple[str, str, float]] = []
        self.befores: list[float] = []
        self.transcripts: list[list[str]] = []
        self.max_action_chars = max_action_chars
        self.judge = judge  # optional async (problem, output) -> score in [0, 1], query mode only
        self.uid = uid  # the GRPO group: its rollouts draw the same samples
        self.draws = problems if isinstance(problems, Draws) else None
        self.problems = [] if isinstance(problems, Draws) else list(problems)  # query mode: the one problem
        self.baselines = baselines or Baselines()
        self.decoys = list(decoys)
        self.started = time.monotonic()

    @property
    def scoring(self) -> str:
        return self.meter.scoring

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

    def _same_as(self, workflow: WorkflowCode) -> str | None:
        what = self.known.get(behaviour_hash(workflow.graph, workflow.prompt))
        return SAME_WORKFLOW.format(what=what) if what else None

    async def step(self, text: str) -> tuple[str, float, bool, dict]:
        if self.done:
            raise RuntimeError("step() on a finished episode")
        anchor = anchor_of(self.current.graph, self.current.prompt)
        action = project(text[: self.max_action_chars + 1] if len(text) > self.max_action_chars else text,
                         self.current.graph, self.current.prompt, self.tried)
        if len(text) > self.max_action_chars:
            action = type(action)(action.modification, "", "", False, f"answer over {self.max_action_chars} characters")
        reason = action.reason if not action.is_valid else self._same_as(action.workflow)
        if reason:
            turn = Turn(anchor, False, 0.0, reason)
            self.turns.append(turn)
            return self._reply(turn)
        if self.mode == "query":
            scored = await self._evaluate(action.workflow)
            reward = scored.score
        else:
            scored, baseline = await self._paired(action.workflow)
            reward = scored.score - baseline
        turn = Turn(anchor, True, reward, "", scored.score, action.modification)
        self.turns.append(turn)
        self.nodes.append((action.modification, scored))
        self.tried.add(normalize_modification(action.modification))
        self.known[scored.hash] = "an earlier workflow of this episode"
        if self.mode == "task":
            self._moved(action.modification, baseline, scored)
            self.current_code = action.workflow
        return self._reply(turn)

    def _moved(self, modification: str, before: float, scored: Scored) -> None:
        """Task mode: the episode is now at a new workflow, recorded with its parent's paired score."""
        self.experience = self.experience + [Experience(-1, -1, modification, before, scored.score)]
        self.befores.append(before)
        self.current = scored

    async def _paired(self, workflow: WorkflowCode) -> tuple[Scored, float]:
        """The proposal and the workflow it modifies, measured on this turn's fresh sample; the proposal
        also runs on the feedback problems, whose failures the next observation shows."""
        sample = self.draws.sample(self.uid, len(self.turns))
        key = (self.current.hash, ",".join(sorted(p.id for p in sample)))
        current = self.current_code

        async def baseline_run() -> Scored:
            return (await measure(current, sample, self.meter))[0]

        (proposal, _), (baseline, made) = await asyncio.gather(
            measure(workflow, sample, self.meter, self.draws.feedback), self.baselines.get(key, baseline_run))
        if made:
            self.remeasured.append((key[0], key[1], baseline.score))
        return proposal, baseline.score

    async def _evaluate(self, workflow: WorkflowCode) -> Scored:
        """Query mode: the workflow's credit on its one problem, lifted by the judge if configured."""
        scored, transcripts = await measure(workflow, self.problems, self.meter, decoys=self.decoys)
        self.transcripts.extend(t for t in transcripts if t)
        if self.judge is not None and scored.output is not None and self._executor_made(scored):
            scored.score = max(scored.score, await self._judged(scored.output))
        scored.output = scored.counterfactual_output = None  # read: not kept with the node
        return scored

    def _executor_made(self, scored: Scored) -> bool:
        """The output came from the executor: without it (the counterfactual), the workflow scored 0
        and answered something else. Only then may a judge lift the score (a paraphrased constant
        scores 0 lexically, and a judge would accept it)."""
        if not self.meter.counterfactual:
            return True
        return scored.counterfactual_score == 0 and scored.counterfactual_output != scored.output

    async def _judged(self, output) -> float:
        """The judge lifts a lexical score that misses a paraphrase, never lowers it; under `reward`
        scoring the hedge gate (aflow.benchmarks.qa.gate) comes after it and has the last word, so an
        answer that hedges or stuffs words stays at 0 whatever the judge says; it is not even asked,
        since a hedge that contains the right answer is exactly what a judge is apt to accept."""
        problem = self.problems[0]
        if self.scoring == "reward" and self.bench.name in QA_BENCHMARKS and qa.gate(problem, output) is not None:
            return 0.0
        return await self.judge(problem, output)

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
                       sum(s.cost_usd for _, s in self.nodes), sum(s.calls for _, s in self.nodes),
                       sum(s.tokens for _, s in self.nodes), failed, self.remeasured, self.transcripts,
                       self.befores)
