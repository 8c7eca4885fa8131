import asyncio

import pytest

from aflow.benchmarks import Problem, get_benchmark, qa, scoring
from aflow.sandbox import Limits


@pytest.mark.parametrize("output,expected,score", [
    ("so the total is 65,960 signatures", "65,960", 1.0),
    ("The answer is 36.", "36", 1.0),
    ("36.01", "36", 0.0),
    ("36.0000001", "36", 1.0),
    ("first 12, then 7", "12", 0.0),
    ("no number at all", "3", 0.0),
    ("-4", "-4", 1.0),
])
def test_gsm8k_last_number(output, expected, score):
    assert scoring.number_score(output, expected) == score


@pytest.mark.parametrize("output,solution,score", [
    # AFlow's rule: equal strings, numbers within 1e-3, plain expressions sympy finds equal
    ("thus \\boxed{\\frac{1}{2}}", "... \\boxed{\\frac{1}{2}}", 1.0),
    ("the value is \\boxed{0.5}", "\\boxed{1/2}", 1.0),
    ("\\boxed{2*sqrt(2)}", "\\boxed{sqrt(8)}", 1.0),
    ("\\boxed{(x+1)^2}", "\\boxed{x^2+2*x+1}", 1.0),
    ("\\boxed{\\text{(C)}}", "\\boxed{\\text{(C)}}", 1.0),
    ("\\boxed{25\\%}", "\\boxed{0.25}", 1.0),
    ("\\boxed{3}", "\\boxed{4}", 0.0),
    ("nothing boxed, answer 7", "\\boxed{8}", 0.0),
    # LaTeX is never parsed (AFlow's environment has no antlr4 for sympy's parse_latex)
    ("\\boxed{\\dfrac{1}{2}}", "\\boxed{\\frac{1}{2}}", 0.0),
    ("the value is \\boxed{0.5}", "\\boxed{\\frac12}", 0.0),
    ("\\boxed{2\\sqrt{2}}", "\\boxed{\\sqrt{8}}", 0.0),
    # defects fixed: nested braces, \\fbox
    ("\\boxed{\\frac{6\\sqrt{10}}{7}}", "so $\\boxed{\\frac{6\\sqrt{10}}{7}}$.", 1.0),
    ("\\fbox{5}", "\\boxed{5}", 1.0),
])
def test_math_equivalence(output, solution, score):
    assert scoring.math_score(output, solution) == score


def test_last_boxed_balances_braces():
    assert scoring.last_boxed("a \\boxed{1} then \\boxed{\\frac{a}{b}} end") == "\\frac{a}{b}"
    assert scoring.last_boxed("\\boxed{unclosed") is None
    assert scoring.last_boxed("\\boxed{1} and \\boxed{unclosed") == "1"  # as AFlow's findall
    assert scoring.last_boxed("\\boxed{\\frac{6\\sqrt{10}}{7}}") == "\\frac{6\\sqrt{10}}{7}"
    assert scoring.last_boxed("\\boxed{1} \\fbox{2}") == "2"
    assert scoring.last_boxed("\\boxed{\\boxed{5}}") == "\\boxed{5}"  # not overlapping, as AFlow


def test_math_answer_is_the_last_sentence_when_nothing_is_boxed():
    assert scoring.math_answer("We get 3.5 apples. So the answer is 7") == "So the answer is 7"
    assert scoring.math_answer("So 7.\n\n") == "So 7."
    assert scoring.math_answer("  ") == ""


def test_f1_and_drop_max():
    assert qa.f1("The Eiffel Tower", "eiffel tower") == 1.0
    assert qa.f1("red", "blue") == 0.0
    assert abs(qa.f1("new york city", "new york") - 0.8) < 1e-9
    assert qa.max_f1("Volquin von Winterstein", ["Volquin von Winterstein", "Volquin von Winterstei"]) == 1.0
    assert qa.max_f1("4", ["3", "4"]) == 1.0


def test_humaneval_scoring_runs_tests_in_sandbox():
    bench = get_benchmark("humaneval")
    prompt = "from typing import List\n\ndef helper(x):\n    return x + 1\n\ndef f(xs: List[int]) -> List[int]:\n    \"\"\"add one\"\"\"\n"
    problem = Problem(id="t", inputs={"problem": prompt, "entry_point": "f"},
                      reference={"prompt": prompt, "entry_point": "f",
                                 "test": "def check(candidate):\n    assert candidate([1]) == [2]\n"})
    # The solution uses the prompt's helper and its typing import without repeating them.
    good = "def f(xs: List[int]) -> List[int]:\n    return [helper(x) for x in xs]\n"
    bad = "def f(xs):\n    return xs\n"
    assert asyncio.run(bench.score(problem, good)) == (1.0, None)
    score, reason = asyncio.run(bench.score(problem, bad))
    assert score == 0.0 and "AssertionError" in reason
    # a wall clock shorter than the CPU limit: the loop is stopped by the clock, whatever the machine's load
    score, reason = asyncio.run(bench.score(problem, "def f(xs):\n    while True: pass\n",
                                            limits=Limits(wall_seconds=2, cpu_seconds=15)))
    assert (score, reason) == (0.0, "timed out after 2s (wall clock)")


def test_malformed_line_is_a_failed_problem(tmp_path):
    (tmp_path / "gsm8k_validate.jsonl").write_text(
        '{"question": "1+1?", "answer": "2", "id": "a"}\n{not json\n["a list"]\n{"question": "no answer"}\n'
    )
    problems = get_benchmark("gsm8k").load("validate", tmp_path)
    assert [p.error is None for p in problems] == [True, False, False, False]
    assert all("malformed JSONL line" in p.error for p in problems[1:])


@pytest.mark.parametrize("variant", ["aflow", "reward"])
@pytest.mark.parametrize("benchmark,reference,hedges", [
    ("gsm8k", {"answer": "36"}, ["36 or 35", "It is 36, or maybe 35.", "36 | 37", "Either 36 or 0", "36\n37"]),
    ("math", {"solution": "So the answer is $\\boxed{7}$."},
     ["\\boxed{7} or \\boxed{8}", "\\boxed{7}, \\boxed{8}", "\\boxed{7 \\text{ or } 8}", "\\boxed{7, 8}",
      "The answer is 7 or 8.", "\\boxed{7} \\boxed{}"]),
])
def test_listing_several_answers_earns_nothing(benchmark, reference, hedges, variant):
    """One answer is read (the last number, the last box): offering several never pays, while
    the reference alone scores 1.0."""
    bench = get_benchmark(benchmark)
    gold = reference.get("answer") or reference["solution"]
    problem = Problem(id="h", inputs={"problem": "?"}, reference=reference, gold=gold)
    assert asyncio.run(bench.score(problem, gold, scoring=variant))[0] == 1.0
    for hedge in hedges:
        assert asyncio.run(bench.score(problem, hedge, scoring=variant))[0] == 0.0, hedge
