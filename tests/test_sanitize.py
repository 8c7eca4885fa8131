"""AFlow's code sanitising: which part of an answer is the solution (scripts/utils/sanitize.py)."""

from __future__ import annotations

import ast
import random

import pytest

from aflow.benchmarks.sanitize import MAX_LINES, SanitizeError, code_extract, sanitize


def naive_code_extract(text: str) -> str:
    """AFlow's rule as written there: every pair i < j, the most non-blank lines wins, first on a tie."""
    lines = text.split("\n")
    best, pair = 0, (0, 0)
    for i in range(len(lines)):
        for j in range(i + 1, len(lines)):
            try:
                ast.parse("\n".join(lines[i : j + 1]))
            except SyntaxError:
                continue
            count = sum(1 for line in lines[i : j + 1] if line.strip())
            if count > best:
                best, pair = count, (i, j)
    return "\n".join(lines[pair[0] : pair[1] + 1])


PIECES = ["Here is the solution:", "```python", "```", "", "   ", "def f(x):", "    return x + 1",
          "print(f(2))", "x = 3", "The answer uses a loop.", "    if x:", "        pass", "import math",
          "class A:", "    y = 1", "return 5", "# comment", "def g(", "    a,", "):", "    return a"]


@pytest.mark.parametrize("seed", range(300))
def test_pruned_extraction_equals_aflows_exhaustive_one(seed):
    rng = random.Random(seed)
    text = "\n".join(rng.choice(PIECES) for _ in range(rng.randint(1, 14)))
    assert code_extract(text) == naive_code_extract(text)


def test_fenced_code_in_prose_is_extracted():
    answer = ("Sure! Here is my solution.\n\n```python\nimport math\n\ndef area(r):\n    return math.pi * r * r\n```\n"
              "\nThis computes the area of a circle.")
    assert sanitize(answer, "area") == "import math\ndef area(r):\n    return math.pi * r * r"


def test_only_imports_and_what_the_entry_point_needs_are_kept():
    answer = ("import re\nfrom typing import List\nLIMIT = 10\nUNUSED = 3\n\ndef helper(x):\n    return x * LIMIT\n\n"
              "def other():\n    return 1\n\ndef solve(xs: List[int]):\n    return [helper(x) for x in xs]\n\n"
              "print(solve([1, 2]))\nassert solve([1]) == [10]\n")
    kept = sanitize(answer, "solve")
    assert kept.splitlines()[:2] == ["import re", "from typing import List"]
    assert "LIMIT = 10" in kept and "def helper" in kept and "def solve" in kept
    assert "UNUSED" not in kept and "def other" not in kept and "print(" not in kept and "assert" not in kept


def test_a_single_line_is_never_a_run():
    # AFlow pairs i < j only: a one-line answer after prose leaves the answer's first line.
    assert code_extract("The function:\ndef f(x): return x") == "The function:"
    assert sanitize("def f(x): return x", "f") == "def f(x):\n    return x"


def test_entry_point_missing_leaves_only_imports():
    assert sanitize("import math\ndef g():\n    return 1\n", "f") == "import math"


def test_overlong_answer_is_refused():
    with pytest.raises(SanitizeError):
        code_extract("x = 1\n" * (MAX_LINES + 1))
