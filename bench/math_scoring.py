"""What MATH scoring costs: milliseconds per answer, and how long a hostile answer holds the event loop.

    python -m bench.math_scoring [--data-dir DIR] [--timeout S] [--repeat R]

The exact times that tests/test_math_scoring.py no longer asserts (on a busy machine they
measure the machine): the tests keep load-proof forms of them.

Part 1 scores every reference solution of MATH (validate + test, 605 problems), as written
and as its boxed answer alone in a sentence (1,210 answers), through `Benchmark.score` (the
call `aflow evaluate` and the RL environment make), for each scoring variant. The cheap
checks in the event loop decide them all, so no scoring worker starts. Printed per variant:
answers, mean milliseconds per answer (target: under 5 ms), workers started (expected 0).

Part 2 scores each hostile answer of the tests (`HOSTILE_SLOW`) with the per-call bound at
--timeout seconds (the tests' 3 s), one at a time on a warm worker, with a task beside it
that wakes every 10 ms. Printed per answer (the longest over R repeats): seconds to the score,
the longest wall-clock gap between two ticks in milliseconds (target: under 500 ms, what the
test asserted before; the test now asserts the loop thread's CPU time in a gap and the ticks
served), and the loop thread's CPU milliseconds in that gap. Names are shortened to
identifiers (``hostile.<name>.seconds``).

Output is one ``name: value`` per line.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import re
import time
from pathlib import Path

from aflow.benchmarks import get_benchmark, scoring
from tests.test_math_scoring import HOSTILE_SLOW, PROBLEM, score_while_ticking

REPO = Path(__file__).resolve().parents[1]
BENCH = get_benchmark("math")


def emit(name: str, value) -> None:
    if isinstance(value, float):
        value = f"{value:.4f}"
    print(f"{name}: {value}", flush=True)


def references(data_dir: Path, variant: str) -> None:
    problems = BENCH.load("validate", data_dir) + BENCH.load("test", data_dir)
    cases = [(p, output) for p in problems
             for output in (p.gold, f"The answer is $\\boxed{{{scoring.last_boxed(p.gold)}}}$.")]
    started_workers = scoring.MATH_POOL.started

    async def all_gold():
        return [await BENCH.score(p, output, scoring=variant) for p, output in cases]

    began = time.perf_counter()
    results = asyncio.run(all_gold())
    seconds = time.perf_counter() - began
    emit(f"references.{variant}.answers", len(results))
    emit(f"references.{variant}.scored_1", sum(r == (1.0, None) for r in results))
    emit(f"references.{variant}.ms_per_answer", seconds / len(results) * 1000)
    emit(f"references.{variant}.workers_started", scoring.MATH_POOL.started - started_workers)


async def gaps_while_scoring(output: str) -> tuple[float, float, float]:
    """(seconds, longest wall gap between 10 ms ticks of the loop, the loop thread's CPU in that gap)."""
    _, started, finished, ticks = await score_while_ticking(output)
    wall, cpu = max((after[0] - before[0], after[1] - before[1])
                    for before, after in zip(ticks, ticks[1:], strict=False))
    return finished - started, wall, cpu


def hostile(timeout: float, repeat: int) -> None:
    scoring.MATH_SCORE_TIMEOUT_S = timeout
    for name, output in HOSTILE_SLOW.items():
        worst = (0.0, 0.0, 0.0)
        for _ in range(repeat):
            asyncio.run(BENCH.score(PROBLEM, "\\boxed{0.5}"))  # a warm idle worker (a timeout replaces it)
            gc.collect()
            worst = max(worst, asyncio.run(gaps_while_scoring(output)), key=lambda m: m[1])
        key = re.sub(r"\W+", "_", name).strip("_")
        elapsed, wall, cpu = worst
        emit(f"hostile.{key}.seconds", elapsed)
        emit(f"hostile.{key}.longest_loop_gap_ms", wall * 1000)
        emit(f"hostile.{key}.loop_cpu_in_that_gap_ms", cpu * 1000)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=os.environ.get("AFLOW_DATA_DIR")
                        or str(REPO.parent / "shared" / "data" / "aflow"))
    parser.add_argument("--timeout", type=float, default=3.0)
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args()
    asyncio.run(BENCH.score(PROBLEM, "\\boxed{0.5}"))  # start the worker: part 1 must start none
    for variant in ("aflow", "reward"):
        references(Path(args.data_dir), variant)
    hostile(args.timeout, args.repeat)


if __name__ == "__main__":
    main()
