"""Run one workflow over a benchmark split and score it: the core loop every later layer reuses."""

from __future__ import annotations

import asyncio
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from aflow.benchmarks import SCORING_VARIANTS, Benchmark, DataError, Problem, get_benchmark, public_tests
from aflow.config import EvalConfig
from aflow.files import JsonlAppender, atomic_write_json
from aflow.llm import LLMClient, Usage
from aflow.operators import OPERATOR_NAMES, OperatorContext
from aflow.sandbox import WORKFLOW_LIMITS, Limits, Sandbox
from aflow.workflows import GOLD, WorkflowCheckError, WorkflowCode, load_workflow

INPUT_CHARS_KEPT = 2000


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
    scoring: str = "aflow"  # the scoring variant (SCORING_VARIANTS) that gave `score`


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


async def run_problem(bench: Benchmark, problem: Problem, workflow: WorkflowCode | WorkflowCheckError,
                      llm: LLMClient | None, tests: dict, sandbox: Sandbox,
                      limits: Limits = WORKFLOW_LIMITS, scoring: str = "aflow") -> tuple[Record, list[str]]:
    """Run and score one problem under the `scoring` variant; every failure becomes part of the record."""
    started = time.monotonic()
    usage = Usage()
    output, error, isolation = None, problem.error, []
    if error is None:
        if isinstance(workflow, WorkflowCheckError):
            error = f"workflow rejected: {workflow}"
        else:
            ctx = OperatorContext(llm, usage, tests, sandbox=sandbox)
            inputs = {**problem.inputs, "gold": problem.gold} if workflow.name == GOLD else problem.inputs
            result = await sandbox.run_workflow(workflow.graph, workflow.prompt, inputs, ctx.call,
                                        OPERATOR_NAMES, workflow.format, bench.name, limits)
            output, error, isolation = result.value, result.error, result.isolation
            if result.ok and output is None:
                error = "the workflow returned None"
    score, reason = (0.0, None)
    if error is None:
        score, reason = await bench.score(problem, output, sandbox=sandbox, scoring=scoring)
    record = Record(
        id=problem.id, input=str(problem.inputs.get("problem", ""))[:INPUT_CHARS_KEPT], output=output,
        score=score, error=error, score_reason=reason, prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens, calls=usage.calls, cost_usd=usage.cost_usd,
        latency_s=round(time.monotonic() - started, 3), scoring=scoring,
    )
    return record, isolation


async def evaluate(config: EvalConfig, llm: LLMClient | None, progress: bool = True) -> tuple[Summary, list[Record]]:
    """Evaluate `config.workflow` on `config.benchmark`/`config.split`; writes results under config.out."""
    started = time.monotonic()
    if config.scoring not in SCORING_VARIANTS:
        raise DataError(f"unknown scoring variant '{config.scoring}' (choose from: {', '.join(SCORING_VARIANTS)})")
    bench = get_benchmark(config.benchmark)
    problems = bench.load(config.split, config.data_dir, config.limit)
    try:
        workflow: WorkflowCode | WorkflowCheckError = load_workflow(config.workflow)
    except WorkflowCheckError as exc:  # bad code is a result, not a set-up error
        workflow = exc
    tests = public_tests(bench.name, config.data_dir) if bench.is_code else {}
    out = Path(config.out) if config.out else None
    appender = JsonlAppender(out / "results.jsonl") if out else None
    semaphore = asyncio.Semaphore(problems_in_flight(config.concurrency, llm))
    usage_before = Usage(**asdict(llm.usage)) if llm else Usage()
    records: list[Record] = []
    isolation: list[str] = []
    bar = _progress_bar(len(problems), f"{bench.name}/{config.split}", progress)

    async def one(problem: Problem) -> None:
        async with semaphore:
            record, layers = await run_problem(bench, problem, workflow, llm, tests, sandbox, scoring=config.scoring)
        records.append(record)
        if layers and not isolation:
            isolation.extend(layers)
        if appender:
            appender.write(asdict(record))
        if bar is not None:
            bar.update(1)
            bar.set_postfix(score=f"{sum(r.score for r in records) / len(records):.3f}")

    sandbox = await Sandbox().start()
    try:
        await asyncio.gather(*(one(p) for p in problems))
    finally:
        await sandbox.close()
        if appender:
            appender.close()
        if bar is not None:
            bar.close()
    order = {p.id: i for i, p in enumerate(problems)}
    records.sort(key=lambda r: order.get(r.id, 0))
    spent = Usage()
    if llm:
        spent = Usage(**{k: getattr(llm.usage, k) - getattr(usage_before, k) for k in asdict(spent)})
    summary = Summary(
        benchmark=bench.name, split=config.split, workflow=config.workflow, n=len(records),
        score=round(sum(r.score for r in records) / len(records), 6) if records else 0.0,
        errors=sum(r.error is not None for r in records), calls=spent.calls, cached_calls=spent.cached,
        prompt_tokens=spent.prompt_tokens, completion_tokens=spent.completion_tokens,
        cost_usd=round(spent.cost_usd, 6), wall_s=round(time.monotonic() - started, 3),
        executor=f"{llm.config.model}@{llm.config.base_url}" if llm else None, isolation=isolation,
        scoring=config.scoring,
    )
    if out:
        atomic_write_json(out / "summary.json", asdict(summary))
    return summary, records


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
