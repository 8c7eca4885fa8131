"""One answer never changes another problem's score, nor stops the run (issue 21, part 2).

Hostile answers: a code answer that is slow to sanitise (unclosed brackets, line after line), code
nested past Python's recursion limit, and workflow outputs nested from a little to far too deep.
Each is scored next to honest answers, concurrently, as `aflow evaluate` and the environment score
them: the honest ones score what they score alone, the hostile one 0 with a reason, and nothing raises.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from aflow.benchmarks import get_benchmark
from aflow.sandbox import Sandbox
from tests.fake_openai import FakeOpenAI
from tests.test_evaluate_faults import aflow_evaluate, gold_reply, gsm8k_rows, last_json, read_results


def humaneval(n: int):
    """The first n HumanEval problems of the package's split, each with its canonical solution."""
    problems = get_benchmark("humaneval").load("test")[:n]
    return [(p, p.gold) for p in problems]


def score_together(answers):
    """(score, reason) of each (problem, answer), all scored at once in one event loop and sandbox."""
    bench = get_benchmark("humaneval")

    async def go():
        async with Sandbox() as sandbox:
            return await asyncio.gather(*(bench.score(p, a, sandbox=sandbox, scoring="reward") for p, a in answers))

    return asyncio.run(go())


SLOW_TO_SANITISE = "x = (1,\n" * 400  # every run of lines is parsed: ~50 s in the loop, siblings time out


def nested_unary(depth: int) -> str:
    return "def {entry}(*args):\n    return " + "-" * depth + "1\n"


def nested_brackets(depth: int) -> str:
    return "def {entry}(*args):\n    return " + "(" * depth + "1" + ")" * depth + "\n"


@pytest.mark.parametrize("hostile", [
    pytest.param(SLOW_TO_SANITISE, id="slow-to-sanitise"),
    *[pytest.param(nested_unary(d), id=f"unary-{d}") for d in (100, 1_000, 5_000, 50_000)],
    *[pytest.param(nested_brackets(d), id=f"brackets-{d}") for d in (100, 1_000, 5_000)],
])
def test_a_hostile_code_answer_scores_zero_and_its_siblings_score_as_alone(hostile):
    honest = humaneval(3)
    alone = score_together(honest)
    target = honest[2][0]  # the hostile answer defines this problem's entry point: sanitising keeps it
    hostile = hostile.replace("{entry}", target.reference["entry_point"])
    together = score_together([*honest[:2], (target, hostile), honest[2]])
    assert alone == [(1.0, None)] * 3
    assert [together[i] for i in (0, 1, 3)] == alone
    value, reason = together[2]
    assert value == 0.0 and reason


HOSTILE_WORKFLOW = '''from aflow_ops import Custom


class Workflow:
    def __init__(self):
        self.custom = Custom()

    async def __call__(self, problem):
        answer = (await self.custom(input=problem, instruction=""))["response"]
        if {snippet!r} in problem:
            for _ in range({depth}):
                answer = [answer]
        return answer
'''


@pytest.mark.parametrize("depth", [1, 64, 65, 300, 900, 5_000])
def test_a_deeply_nested_output_is_that_problems_error_and_every_result_is_written(tmp_path, gsm8k, depth):
    rows = gsm8k_rows(gsm8k, 4)
    workflow = tmp_path / "wf"
    workflow.mkdir()
    (workflow / "graph.py").write_text(HOSTILE_WORKFLOW.format(snippet=rows[0]["question"][:40], depth=depth))
    with FakeOpenAI(reply=gold_reply(rows)) as fake:
        honest = last_json(aflow_evaluate(tmp_path, gsm8k.parent, "--limit", "4", base_url=fake.base_url,
                                          out="honest"))
        run = aflow_evaluate(tmp_path, gsm8k.parent, "--limit", "4", "--workflow", str(workflow),
                             base_url=fake.base_url, out="hostile")
    summary = last_json(run)
    records = {r["id"]: r for r in read_results(tmp_path / "hostile")}
    baseline = {r["id"]: r for r in read_results(tmp_path / "honest")}
    assert honest["n"] == summary["n"] == 4 and len(records) == 4
    first = next(r for r in records.values() if rows[0]["question"][:40] in r["input"])
    others = [i for i in records if i != first["id"]]
    assert {i: records[i]["score"] for i in others} == {i: baseline[i]["score"] for i in others}
    if depth <= 64:  # a list of lists is an answer like any other (it does not equal the number)
        assert first["error"] is None
    else:
        # too deep to keep (the parent's check), or to send at all (the sandbox child's encoder gives up)
        assert first["score"] == 0.0 and first["error"], first
        assert "nested more than 64 levels" in first["error"] or "RecursionError" in first["error"], first["error"]
    json.dumps(records)  # everything written reads back
