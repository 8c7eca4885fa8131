"""The project's `aflow` scoring gives AFlow's own score to realistic outputs (tests/parity_set.py).

A pair marked with a `defect` is one where AFlow's rule is a defect this project fixes (README,
"Scoring"): there the project's score is the pair's `project`, not AFlow's."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest

from aflow.benchmarks import get_benchmark
from aflow.sandbox import Sandbox
from tests import parity_set

# Problems read per benchmark: a few hundred pairs each; code problems cost two sandboxes a pair.
PER_BENCHMARK = {"gsm8k": 60, "math": 60, "hotpotqa": 80, "drop": 80, "humaneval": 40, "mbpp": 40}


@pytest.mark.parametrize("name", sorted(parity_set.BUILDERS))
def test_aflow_scoring_matches_aflow(name, data_dir):
    bench = get_benchmark(name)
    problems = {p.id: p for split in bench.splits if bench.file(data_dir, split).is_file()
                for p in bench.load(split, data_dir)[:PER_BENCHMARK[name]]}
    rows = [row for problem in problems.values() for row in parity_set.BUILDERS[name](problem)]
    assert len(rows) >= 300

    async def score_all():
        gate = asyncio.Semaphore(4)
        async with Sandbox() as sandbox:
            async def one(row):
                async with gate:
                    return await bench.score(problems[row["id"]], row["prediction"], sandbox=sandbox, scoring="aflow")
            return await asyncio.gather(*(one(row) for row in rows))

    wrong = [(row["id"], row["format"], row["prediction"][:80], got, reason)
             for row, (got, reason) in zip(rows, asyncio.run(score_all()), strict=True)
             if abs(got - (row["project"] if row.get("defect") else row["expected"])) > 1e-9]
    assert not wrong, (Counter(w[1] for w in wrong), wrong[:5])
