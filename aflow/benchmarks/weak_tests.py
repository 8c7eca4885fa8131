"""Code problems whose hidden tests are no stronger than their visible examples.

A workflow sees a HumanEval problem's docstring examples (`>>> f(x)` and the line after) and, through
the Test operator, the benchmark's public tests (`assert candidate(x) == y`). Where the hidden tests
call the function only on those inputs, a lookup table of the visible examples passes them without
solving anything (HumanEval/34's only hidden assert is its docstring example). `WEAK` lists those
problems, found by the scan below: for each problem of both splits, a solution that answers exactly
the visible examples (and raises otherwise) is run through the real code checker.

Under `--scoring reward` these problems score 0 with the reason (`Benchmark.score`), and the RL data
leaves them out (data_prep, the environment's scoring pool), since no answer to them can be told
apart from a lookup table. `--scoring aflow` scores them as AFlow does.

    python -m aflow.benchmarks.weak_tests [--data-dir DIR]   # scan again; prints WEAK as Python
"""

from __future__ import annotations

import argparse
import ast
import asyncio

# The scan's output on AFlow's splits (2026-12-07): 164 HumanEval problems (131 test + 33 validate) and
# 427 MBPP problems (341 + 86). MBPP's prompts show no example and its public test is the first of three
# hidden asserts, so no MBPP problem is weak.
WEAK: dict[str, frozenset[str]] = {
    "humaneval": frozenset(["HumanEval/34"]),
    "mbpp": frozenset(),
}
REASON = "this problem's hidden tests are no stronger than its visible examples (aflow.benchmarks.weak_tests)"


def is_weak(benchmark: str, problem_id: str) -> bool:
    return problem_id in WEAK.get(benchmark, frozenset())


def visible_examples(problem_text: str, entry_point: str, public: list[str]) -> list[tuple[str, object]]:
    """(repr of the positional arguments, expected value) of every example a workflow can see that
    is written with literals: public `assert candidate(...) == ...` and docstring `>>> entry(...)`."""
    calls: list[tuple[str, str]] = []
    for line in public:
        calls.append((line.strip().removeprefix("assert").strip(), ""))
    lines = problem_text.splitlines()
    for i, line in enumerate(lines[:-1]):
        text = line.strip()
        if text.startswith(f">>> {entry_point}("):
            calls.append((text[4:], lines[i + 1].strip()))
    examples = []
    for call, shown in calls:
        try:
            node = ast.parse(call if not shown else f"{call} == {shown}", mode="eval").body
            if not (isinstance(node, ast.Compare) and len(node.ops) == 1 and isinstance(node.ops[0], ast.Eq)
                    and isinstance(node.left, ast.Call) and not node.left.keywords):
                continue
            args = tuple(ast.literal_eval(a) for a in node.left.args)
            examples.append((repr(args), ast.literal_eval(node.comparators[0])))
        except (SyntaxError, ValueError, TypeError, RecursionError, MemoryError):
            continue
    return examples


def lookup_table(entry_point: str, examples: list[tuple[str, object]]) -> str:
    return (f"TABLE = {examples!r}\n\n\ndef {entry_point}(*args):\n    for key, value in TABLE:\n"
            f"        if key == repr(args):\n            return value\n    raise NotImplementedError\n")


async def scan(data_dir) -> dict[str, list[str]]:
    from aflow.benchmarks import get_benchmark, public_tests
    from aflow.sandbox import Sandbox

    found: dict[str, list[str]] = {}
    async with Sandbox() as sandbox:
        for name in ("humaneval", "mbpp"):
            bench = get_benchmark(name)
            public = public_tests(name, data_dir)
            found[name] = []
            for split in ("validate", "test"):
                for problem in bench.load(split, data_dir):
                    entry = problem.reference["entry_point"]
                    examples = visible_examples(problem.inputs["problem"], entry, public.get(entry, []))
                    if not examples:
                        continue
                    value, _ = await bench.score(problem, lookup_table(entry, examples), sandbox=sandbox,
                                                 scoring="aflow")
                    if value == 1.0:
                        found[name].append(problem.id)
    return found


def main() -> None:
    from aflow.benchmarks import resolve_data_dir

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args()
    found = asyncio.run(scan(resolve_data_dir(args.data_dir)))
    print("WEAK: dict[str, frozenset[str]] = {")
    for name, ids in found.items():
        print(f"    {name!r}: frozenset({sorted(ids)!r}),")
    print("}")


if __name__ == "__main__":
    main()
