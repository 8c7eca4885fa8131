"""What a workflow earns in the environment: what its executor calls produced, within its budgets.

A workflow's credit on a problem is `max(0, real − counterfactual)`: `real` is its score with the
executor; `counterfactual` is its score when the same code runs again with every executor reply
replaced by the reply another problem's run got at the same position (`ReplayExecutor`; no LLM
cost). An answer that does not depend on the executor (a constant, a memorised answer, a string
built from the problem's own words, a guess from `random`, which the sandbox seeds per job) comes
out the same both times and earns nothing; an honest workflow's replies for another problem
answer the wrong question, so its counterfactual scores 0 and its credit is its score.

Budgets are charged to the workflow that spends them: each measurement runs at most
`Meter.per_workflow` problems at once (so one workflow can never hold all of a worker's slots),
its problems share one time budget (slot-seconds: a problem that starts after it is spent fails
at once, "time budget spent"), and each run is bounded in executor calls and tokens
(`aflow.operators.CallPolicy`). A timeout is a failed problem of that workflow, never an error of
the episode or of a sibling queued behind it.

Nothing here keeps an output past the measurement except, bounded, the failures shown to the
policy (and, in query mode, the one output an LLM judge reads).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field, replace
from typing import Any

from aflow.benchmarks import Benchmark, Problem
from aflow.evaluate import Record, run_problem
from aflow.llm import Completion
from aflow.operators import CallPolicy
from aflow.sandbox import WORKFLOW_LIMITS, Limits, Sandbox
from aflow.workflows import WorkflowCode
from aflow.workflows.identity import behaviour_hash

FAILURES_SHOWN = 5
FAILURE_CHARS = 1000  # of a failure's output kept (a workflow may return megabytes)


@dataclass
class Scored:
    """One measurement of a workflow: its mean credit on the problems it was scored on."""

    graph: str
    prompt: str
    score: float
    cost_usd: float = 0.0
    calls: int = 0  # executor requests of the scored and feedback runs, cache hits included
    tokens: int = 0  # their prompt + completion tokens, cache hits included
    failures: list[dict] = field(default_factory=list)  # feedback problems it got wrong (shown to the policy)
    errors: list[str] = field(default_factory=list)  # why scored problems failed to run (cut), one per failure
    raw: float = 0.0  # the mean score before the counterfactual: what the answers scored
    # one problem only (query mode): its output, and its score and output under the counterfactual
    # executor; the episode reads them (the judge) and drops them before the measurement is kept
    output: Any = None
    counterfactual_score: float | None = None
    counterfactual_output: Any = None

    @property
    def hash(self) -> str:
        return behaviour_hash(self.graph, self.prompt)


class ExecutorUnavailable(RuntimeError):
    """The executor did not answer (after its retries) while a workflow was measured: its score would measure
    the outage, not the workflow, so the measurement, and the episode that needed it, fails instead."""


class ReplayExecutor:
    """The counterfactual executor: the k-th request is answered with `replies[k]` (another problem's
    real replies, in order), then with "" once they run out. No request leaves the process."""

    def __init__(self, replies: list[str]):
        self.replies, self.position = list(replies), 0

    async def chat(self, messages, usage=None, **params) -> Completion:
        text = self.replies[self.position] if self.position < len(self.replies) else ""
        self.position += 1
        return Completion(text, 0, 0, 0.0, cached=True)


@dataclass
class Meter:
    """How the environment measures workflows: one per worker, shared by its episodes."""

    bench: Benchmark
    llm: Any  # aflow.llm.LLMClient
    sandbox: Sandbox | None
    tests: dict
    scoring: str = "reward"
    slots: asyncio.Semaphore | None = None  # the worker's env.concurrency
    policy: CallPolicy = CallPolicy()
    counterfactual: bool = True
    per_workflow: int = 4  # problems of one measurement run at once
    time_budget_s: float = 1200.0  # slot-seconds per measurement
    limits: Limits = WORKFLOW_LIMITS  # per problem run

    def bound(self, bench: Benchmark, tests: dict, sandbox: Sandbox) -> Meter:
        """This worker's meter for one benchmark's problems."""
        return replace(self, bench=bench, tests=tests, sandbox=sandbox)

    @classmethod
    def of(cls, cfg, llm, slots: asyncio.Semaphore | None) -> Meter:
        """A worker's meter from its `EnvConfig` (bound to a benchmark and a sandbox later)."""
        return cls(None, llm, None, {}, scoring=cfg.reward.scoring, slots=slots,
                   policy=CallPolicy(cfg.sample_temperature, cfg.max_calls_per_run, cfg.max_tokens_per_run),
                   counterfactual=cfg.reward.counterfactual, per_workflow=cfg.workflow_concurrency,
                   time_budget_s=cfg.workflow_time_budget_s,
                   limits=replace(WORKFLOW_LIMITS, wall_seconds=cfg.problem_time_limit_s))


class _Budget:
    def __init__(self, seconds: float):
        self.left = seconds

    def limits(self, base: Limits) -> Limits | None:
        return None if self.left <= 0 else replace(base, wall_seconds=max(1.0, min(base.wall_seconds, self.left)))


async def measure(workflow: WorkflowCode, problems: list[Problem], meter: Meter, feedback: list[Problem] = (),
                  decoys: list[list[str]] = ()) -> tuple[Scored, list[list[str]]]:
    """Score `workflow` on `problems` (its credit) and run it on `feedback` (the failures it shows).
    `decoys`: real reply transcripts of other problems, for a counterfactual when `problems` has only one.
    Returns the measurement and the real transcripts of `problems` (decoys for later measurements)."""
    budget = _Budget(meter.time_budget_s)
    lane = asyncio.Semaphore(max(1, meter.per_workflow))

    async def run(problem: Problem, llm) -> tuple[Record, list[str]]:
        transcript: list[str] = []
        async with lane:
            if meter.slots is not None:
                await meter.slots.acquire()
            try:
                limits = budget.limits(meter.limits)
                if limits is None:
                    return _spent(problem, meter.scoring), transcript
                started = time.monotonic()
                record, _ = await run_problem(meter.bench, problem, workflow, llm, meter.tests, meter.sandbox,
                                              limits, meter.scoring, meter.policy, transcript)
                budget.left -= time.monotonic() - started
                return record, transcript
            finally:
                if meter.slots is not None:
                    meter.slots.release()

    everything = list(problems) + list(feedback)
    results = await asyncio.gather(*(run(p, meter.llm) for p in everything))
    records = [r for r, _ in results]
    down = [r for r in records if r.executor_outages]
    if down:  # a call the workflow got wrong (a 400) is the workflow's failure; an outage is nobody's score
        raise ExecutorUnavailable(f"the executor failed {sum(r.executor_outages for r in down)} call(s) after every "
                                  f"retry in {len(down)} of {len(records)} problems (first: {down[0].error})")
    transcripts = [t for _, t in results[:len(problems)]]
    credit = [r.score for r in records[:len(problems)]]
    replayed: list[Record | None] = [None] * len(problems)
    if meter.counterfactual:
        replayed = await _counterfactual(problems, records, transcripts, decoys, run)
        credit = [0.0 if c is None else max(0.0, r.score - c.score) for r, c in zip(records, replayed, strict=False)]
    failures = [{"input": r.input, "output": _cut(r.output), "score": r.score, "error": r.error,
                 "score_reason": r.score_reason} for r in records[len(problems):] if r.score < 1][:FAILURES_SHOWN]
    n = max(1, len(problems))
    scored = Scored(workflow.graph, workflow.prompt, sum(credit) / n,
                    cost_usd=sum(r.cost_usd for r in records),
                    calls=sum(r.calls + r.cached_calls for r in records),
                    tokens=sum(r.prompt_tokens + r.completion_tokens + r.cached_tokens for r in records),
                    failures=failures, raw=sum(r.score for r in records[:len(problems)]) / n,
                    errors=[r.error[:200] for r in records[:len(problems)] if r.error])
    if len(problems) == 1:
        scored.output = records[0].output
        if replayed[0] is not None:
            scored.counterfactual_score, scored.counterfactual_output = replayed[0].score, replayed[0].output
    return scored, transcripts


async def _counterfactual(problems, records, transcripts, decoys, run) -> list[Record | None]:
    """Each problem run again under another problem's replies: where it scored above 0 (below, its
    credit is 0 anyway), and always when there is one problem (the judge reads the outcome)."""
    if len(problems) == 1:
        others = [next((d for d in decoys if d != transcripts[0]), [])]
    else:
        others = [transcripts[(i + 1) % len(problems)] for i in range(len(problems))]

    async def one(i: int) -> Record | None:
        if records[i].score <= 0 and len(problems) > 1:
            return None
        record, _ = await run(problems[i], ReplayExecutor(others[i]))
        return record

    return list(await asyncio.gather(*(one(i) for i in range(len(problems)))))


def _spent(problem: Problem, scoring: str) -> Record:
    return Record(id=problem.id, input=str(problem.inputs.get("problem", ""))[:2000], output=None, score=0.0,
                  error="the workflow's time budget was spent before this problem ran", score_reason=None,
                  scoring=scoring)


def _cut(value: Any) -> Any:
    if value is None:
        return None
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= FAILURE_CHARS else text[:FAILURE_CHARS] + f"... [{len(text) - FAILURE_CHARS} more]"
