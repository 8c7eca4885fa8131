"""Seconds per scored code problem: what the checker costs on HumanEval and MBPP.

    python -m bench.code_scoring [--data-dir DIR] [--limit N] [--concurrency C]

Scores every reference solution of HumanEval (validate + test) and MBPP (validate + test)
through `Benchmark.score`, the call `aflow evaluate` and the RL environment make, with the
sandbox forked from a zygote as in an evaluation. Printed per benchmark: problems, passes,
mean / p50 / p95 seconds per problem scored one at a time, and problems per second with C
scored at once. Before the checker was split into a candidate process and a checker process
(one sandbox per problem) this measured ~17 ms per sandboxed execution; the target for the
split is no more than ~2x that per problem.

Output is one ``name: value`` per line.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
from pathlib import Path

from aflow.benchmarks import get_benchmark
from aflow.sandbox import Sandbox

REPO = Path(__file__).resolve().parents[1]


def emit(name: str, value) -> None:
    if isinstance(value, float):
        value = f"{value:.4f}"
    print(f"{name}: {value}", flush=True)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


async def measure(name: str, data_dir: Path, limit: int | None, concurrency: int) -> None:
    bench = get_benchmark(name)
    problems = [p for split in ("validate", "test") for p in bench.load(split, data_dir)]
    problems = problems[:limit] if limit else problems
    async with Sandbox() as sandbox:
        await bench.score(problems[0], problems[0].gold, sandbox=sandbox)  # warm-up
        seconds, passed = [], 0
        for problem in problems:
            started = time.perf_counter()
            score, _reason = await bench.score(problem, problem.gold, sandbox=sandbox)
            seconds.append(time.perf_counter() - started)
            passed += score == 1.0
        gate = asyncio.Semaphore(concurrency)

        async def one(problem):
            async with gate:
                return await bench.score(problem, problem.gold, sandbox=sandbox)

        started = time.perf_counter()
        await asyncio.gather(*(one(p) for p in problems))
        parallel = time.perf_counter() - started
    emit(f"{name}.problems", len(problems))
    emit(f"{name}.passed", passed)
    emit(f"{name}.seconds_per_problem_mean", statistics.mean(seconds))
    emit(f"{name}.seconds_per_problem_p50", percentile(seconds, 50))
    emit(f"{name}.seconds_per_problem_p95", percentile(seconds, 95))
    emit(f"{name}.problems_per_second_at_{concurrency}", len(problems) / parallel)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=os.environ.get("AFLOW_DATA_DIR")
                        or str(REPO.parent / "shared" / "data" / "aflow"))
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args()
    for name in ("humaneval", "mbpp"):
        asyncio.run(measure(name, Path(args.data_dir), args.limit, args.concurrency))


if __name__ == "__main__":
    main()
