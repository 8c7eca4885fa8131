"""Run one workflow over a benchmark split and score it: the core loop every later layer reuses."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from aflow.benchmarks import SCORING_VARIANTS, Benchmark, DataError, Problem, get_benchmark, public_tests
from aflow.config import EvalConfig
from aflow.files import JsonlAppender, atomic_write_json, atomic_write_text
from aflow.llm import LLMClient, Usage
from aflow.operators import OPERATOR_NAMES, CallPolicy, OperatorContext
from aflow.sandbox import WORKFLOW_LIMITS, Limits, Sandbox
from aflow.workflows import GOLD, WorkflowCheckError, WorkflowCode, load_workflow

MAX_OUTPUT_DEPTH = 64  # nesting of a workflow's output (lists, dicts) kept, scored and written
INPUT_CHARS_KEPT = 2000
EXPECTED_CHARS_KEPT = 4000  # the reference answer (and a code benchmark's tests) kept in each record


@dataclass
class Record:
    id: str
    input: str
    output: Any
    score: float
    error: str | None  # the run failed (bad data, bad workflow, executor down)
    score_reason: str | None  # why a produced output lost points (e.g. a failing test)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    calls: int = 0
    cost_usd: float = 0.0
    latency_s: float = 0.0
    cached_calls: int = 0  # answered by the response cache (not in `calls`)
    cached_tokens: int = 0  # the tokens those cached answers stand for (not in prompt/completion_tokens)
    executor_outages: int = 0  # executor calls that failed on transient errors after every retry (down, not wrong)
    scoring: str = "aflow"  # the scoring variant (SCORING_VARIANTS) that gave `score`
    # The benchmark's reference answer, so a wrong output can be diagnosed from the record alone
    # (code benchmarks: the canonical solution); `tests`: a code benchmark's hidden test source.
    # Both cut at EXPECTED_CHARS_KEPT characters. Records never reach the sandbox.
    expected: str | None = None
    tests: str | None = None


@dataclass
class Summary:
    benchmark: str
    split: str
    workflow: str
    n: int
    score: float
    errors: int
    calls: int
    cached_calls: int
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float
    wall_s: float
    executor: str | None
    isolation: list[str] = field(default_factory=list)
    scoring: str = "aflow"  # `aflow`: AFlow's rules (paper-comparable); `reward`: the hardened RL rules
    planned: int = 0  # problems selected (split and --limit); n < planned when the run was interrupted
    interrupted: bool = False  # stopped early (Ctrl-C): the summary covers the n records completed
    resumed: int = 0  # records carried over from an earlier run into this one (--resume)


async def run_problem(bench: Benchmark, problem: Problem, workflow: WorkflowCode | WorkflowCheckError,
                      llm: LLMClient | None, tests: dict, sandbox: Sandbox,
                      limits: Limits = WORKFLOW_LIMITS, scoring: str = "aflow", policy: CallPolicy = CallPolicy(),
                      transcript: list[str] | None = None) -> tuple[Record, list[str]]:
    """Run and score one problem under the `scoring` variant; every failure becomes part of the record.
    `policy` bounds and samples the run's executor requests; `transcript`, if given, receives its replies."""
    started = time.monotonic()
    usage = Usage()
    output, error, isolation = None, problem.error, []
    if error is None:
        if isinstance(workflow, WorkflowCheckError):
            error = f"workflow rejected: {workflow}"
        else:
            ctx = OperatorContext(llm, usage, tests, sandbox=sandbox, policy=policy, transcript=transcript)
            inputs = {**problem.inputs, "gold": problem.gold} if workflow.name == GOLD else problem.inputs
            result = await sandbox.run_workflow(workflow.graph, workflow.prompt, inputs, ctx.call,
                                        OPERATOR_NAMES, workflow.format, bench.name, limits)
            output, error, isolation = result.value, result.error, result.isolation
            if result.ok and output is None:
                error = "the workflow returned None"
            if ctx.over_budget:  # whatever the workflow made of the refusal, the run spent too much
                output, error = None, ctx.over_budget
            if error is None and nesting(output, MAX_OUTPUT_DEPTH) > MAX_OUTPUT_DEPTH:
                # str(), asdict() and json.dumps() of it would recurse past Python's limit: a crash, not a score
                output, error = None, f"the workflow's output is nested more than {MAX_OUTPUT_DEPTH} levels deep"
    score, reason = (0.0, None)
    if error is None:
        score, reason = await bench.score(problem, output, sandbox=sandbox, scoring=scoring)
    record = Record(
        id=problem.id, input=str(problem.inputs.get("problem", ""))[:INPUT_CHARS_KEPT], output=output,
        score=score, error=error, score_reason=reason, prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens, calls=usage.calls, cost_usd=usage.cost_usd,
        latency_s=round(time.monotonic() - started, 3), cached_calls=usage.cached, cached_tokens=usage.cached_tokens,
        executor_outages=usage.outages, scoring=scoring,
        expected=_cut(problem.gold), tests=_cut(problem.reference.get("test")) if bench.is_code else None,
    )
    return record, isolation


def nesting(value: Any, limit: int) -> int:
    """How deep lists, tuples and dicts nest in `value`, counted without recursion up to limit + 1."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (list, tuple, dict)):
            depth += 1
            deepest = max(deepest, depth)
            if deepest > limit:
                return deepest
            stack.extend((child, depth) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


def _cut(value: Any) -> str | None:
    if value is None:
        return None
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    if len(text) <= EXPECTED_CHARS_KEPT:
        return text
    return text[:EXPECTED_CHARS_KEPT] + f"... [{len(text) - EXPECTED_CHARS_KEPT} more characters]"


def record_from_dict(value: dict) -> Record:
    """A record read back from results.jsonl (fields an older version did not write take their defaults)."""
    names = Record.__dataclass_fields__
    return Record(**{k: v for k, v in value.items() if k in names})


async def evaluate(config: EvalConfig, llm: LLMClient | None, progress: bool = True, *,
                   problems: list[Problem] | None = None, workflow: WorkflowCode | None = None,
                   previous: list[dict] | None = None,
                   stop: asyncio.Event | None = None) -> tuple[Summary, list[Record]]:
    """Evaluate `config.workflow` on `config.benchmark`/`config.split`; writes results under config.out.

    `problems`/`workflow`: already loaded by the caller. `previous`: records of an earlier run into
    the same `config.out` (--resume): their problems are not run again, results.jsonl is appended to.
    `stop`: when set, the problems still running are cancelled and the summary (marked
    `interrupted`) covers those completed. Records are appended to results.jsonl as they complete
    (a crash keeps them); at the end the file is rewritten, atomically, in problem order."""
    started = time.monotonic()
    if config.scoring not in SCORING_VARIANTS:
        raise DataError(f"unknown scoring variant '{config.scoring}' (choose from: {', '.join(SCORING_VARIANTS)})")
    bench = get_benchmark(config.benchmark)
    if problems is None:
        problems = bench.load(config.split, config.data_dir, config.limit)
    if workflow is None:
        try:
            workflow = load_workflow(config.workflow)
        except WorkflowCheckError as exc:  # bad code is a result, not a set-up error (the search relies on it)
            workflow = exc
    tests = public_tests(bench.name, config.data_dir) if bench.is_code else {}
    out = Path(config.out) if config.out else None
    records: list[Record] = [record_from_dict(r) for r in previous or []]
    done_ids = {r.id for r in records}
    todo = [p for p in problems if p.id not in done_ids]
    appender = None
    if out:
        if previous is not None:  # a clean file (a crash may have cut its last line) to append to
            atomic_write_text(out / "results.jsonl", "".join(_jsonl(asdict(r)) for r in records))
        appender = JsonlAppender(out / "results.jsonl", append=previous is not None)
    semaphore = asyncio.Semaphore(problems_in_flight(config.concurrency, llm))
    usage_before = Usage(**asdict(llm.usage)) if llm else Usage()
    isolation: list[str] = []
    bar = _progress_bar(len(problems), f"{bench.name}/{config.split}", progress)
    if bar is not None and records:
        bar.update(len(records))

    async def one(problem: Problem) -> None:
        async with semaphore:
            record, layers = await run_problem(bench, problem, workflow, llm, tests, sandbox, scoring=config.scoring,
                                               policy=CallPolicy(sample_temperature=config.sample_temperature))
        records.append(record)
        if layers and not isolation:
            isolation.extend(layers)
        if appender:
            appender.write(asdict(record))
        if bar is not None:
            bar.update(1)
            bar.set_postfix(score=f"{sum(r.score for r in records) / len(records):.3f}")

    interrupted = False
    sandbox = await Sandbox().start()
    try:
        tasks = [asyncio.ensure_future(one(p)) for p in todo]
        if tasks:
            interrupted = await _until_done_or_stopped(tasks, stop)
    finally:
        await sandbox.close()
        if appender:
            appender.close()
        if bar is not None:
            bar.close()
    order = {p.id: i for i, p in enumerate(problems)}
    records.sort(key=lambda r: order.get(r.id, len(order)))
    spent = Usage()
    if llm:
        spent = Usage(**{k: getattr(llm.usage, k) - getattr(usage_before, k) for k in asdict(spent)})
    earlier = [r for r in records if r.id in done_ids]
    summary = Summary(
        benchmark=bench.name, split=config.split, workflow=config.workflow, n=len(records),
        score=round(sum(r.score for r in records) / len(records), 6) if records else 0.0,
        errors=sum(r.error is not None for r in records), calls=spent.calls + sum(r.calls for r in earlier),
        cached_calls=spent.cached, prompt_tokens=spent.prompt_tokens + sum(r.prompt_tokens for r in earlier),
        completion_tokens=spent.completion_tokens + sum(r.completion_tokens for r in earlier),
        cost_usd=round(spent.cost_usd + sum(r.cost_usd for r in earlier), 6),
        wall_s=round(time.monotonic() - started, 3),
        executor=f"{llm.config.model}@{llm.config.base_url}" if llm else None, isolation=isolation,
        scoring=config.scoring, planned=len(problems), interrupted=interrupted, resumed=len(earlier),
    )
    if out:
        atomic_write_text(out / "results.jsonl", "".join(_jsonl(asdict(r)) for r in records))
        atomic_write_json(out / "summary.json", asdict(summary))
    return summary, records


async def _until_done_or_stopped(tasks: list[asyncio.Future], stop: asyncio.Event | None) -> bool:
    """Wait for every task, or until `stop` is set: then cancel the rest and return True."""
    everything = asyncio.gather(*tasks)
    if stop is None:
        await everything
        return False
    stopper = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({everything, stopper}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopper.cancel()
    if everything.done():
        everything.result()  # a bug in the loop itself is raised, not hidden
        return False
    everything.cancel()
    await asyncio.wait(tasks, timeout=5)  # cancelled sandboxes kill their process groups
    with contextlib.suppress(asyncio.CancelledError):
        if everything.done():
            everything.exception()
    return True


def _jsonl(value: dict) -> str:
    return json.dumps(value, ensure_ascii=False, default=str) + "\n"


def problems_in_flight(concurrency: int, llm: LLMClient | None) -> int:
    """How many problems run at once. The executor is the bottleneck: `concurrency` bounds its
    calls in flight (the client's semaphore), and twice as many problems are started so that
    when a call ends, another problem's sandbox is already up and waiting to use the slot,
    instead of the slot idling through one problem's teardown and the next one's start-up."""
    concurrency = max(1, concurrency)
    return 2 * concurrency if llm is not None else concurrency


def _progress_bar(total: int, label: str, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=label, file=sys.stderr, dynamic_ncols=True, leave=True)
