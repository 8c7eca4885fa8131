"""Operators against a real local HTTP executor: well-formed, malformed and hostile replies."""

import asyncio

import pytest

from aflow import parsing
from aflow.config import LLMConfig
from aflow.llm import LLMClient
from aflow.operators import OPERATORS, OperatorContext, catalogue


def run_op(fake, reply, name, **kwargs):
    fake.reply = reply if callable(reply) else (lambda _messages: reply)

    async def go():
        llm = LLMClient(LLMConfig(base_url=fake.base_url, model="fake", cache=False, backoff_base=0.01))
        try:
            ctx = OperatorContext(llm, public_tests={"add": ["assert candidate(1, 2) == 3"]})
            return await ctx.call(name, kwargs), ctx.usage
        finally:
            await llm.close()

    return asyncio.run(go())


def test_catalogue_lists_every_operator_with_interface():
    text = catalogue()
    for name in ("Custom", "AnswerGenerate", "CustomCodeGenerate", "ScEnsemble", "Programmer", "Test",
                 "Format", "Review", "Revise", "MdEnsemble"):
        assert f"- {name}(" in text
    assert len(OPERATORS) == 10


@pytest.mark.parametrize("reply,answer", [
    ("<thought>2+2</thought><answer>4</answer>", "4"),
    ("<thought>truncated reasoning... <answer>4", "4"),  # unclosed tags
    ("no tags at all\nfinal: 4", "final: 4"),  # falls back to the last line
    ("", ""),
])
def test_answer_generate_never_crashes(fake_openai, reply, answer):
    result, usage = run_op(fake_openai, reply, "AnswerGenerate", input="2+2?")
    assert result["answer"] == answer
    assert usage.calls == 1


def test_sc_ensemble_parses_letter_or_votes(fake_openai):
    result, _ = run_op(fake_openai, "<solution_letter>B</solution_letter>", "ScEnsemble",
                       solutions=["1", "2", "3"], problem="p")
    assert result["response"] == "2"
    result, _ = run_op(fake_openai, "I cannot decide ✓ 🤷", "ScEnsemble", solutions=["7", "9", "9"], problem="p")
    assert result["response"] == "9"  # no letter: the most frequent candidate


def test_programmer_runs_code_in_the_sandbox_and_retries(fake_openai):
    replies = iter([
        "```python\ndef solve(:\n```",  # syntax error: no valid code
        "```python\ndef solve():\n    return 1/0\n```",  # raises: fed back
        "```python\ndef solve():\n    return sum(range(10))\n```",
    ])
    result, usage = run_op(fake_openai, lambda _m: next(replies), "Programmer", problem="sum 0..9")
    assert result["output"] == "45"
    assert usage.calls == 3
    assert "ZeroDivisionError" in fake_openai.chat_requests[2].body["messages"][0]["content"]


def test_programmer_code_cannot_reach_the_network(fake_openai):
    code = (f"```python\nimport urllib.request\ndef solve():\n"
            f"    return urllib.request.urlopen('{fake_openai.base_url}/models').read()\n```")
    result, _ = run_op(fake_openai, code, "Programmer", problem="x", attempts=1)
    assert result["output"].startswith("error:")
    assert [r.path for r in fake_openai.requests if r.method == "GET"] == []


def test_test_operator_uses_public_tests_and_repairs(fake_openai):
    fixed = "```python\ndef add(a, b):\n    return a + b\n```"
    result, usage = run_op(fake_openai, fixed, "Test", problem="add", solution="def add(a, b):\n    return a - b",
                           entry_point="add")
    assert result == {"result": True, "solution": "def add(a, b):\n    return a + b"}
    assert usage.calls == 1


@pytest.mark.parametrize("reply,verdict", [
    ("<review_result>false</review_result><feedback>off by one</feedback>", False),
    ("<review_result>True</review_result><feedback>fine</feedback>", True),
    ("garbage", False),
])
def test_review_verdicts(fake_openai, reply, verdict):
    result, _ = run_op(fake_openai, reply, "Review", problem="p", solution="s")
    assert result["review_result"] is verdict and result["feedback"]


def test_bad_arguments_name_the_interface(fake_openai):
    with pytest.raises(TypeError, match=r"Custom\(input: str"):
        run_op(fake_openai, "x", "Custom", inpt="typo")
    with pytest.raises(ValueError, match="unknown operator"):
        run_op(fake_openai, "x", "Nope")


@pytest.mark.parametrize("text,entry,expected", [
    ("```python\ndef f():\n    return 1\n```", "f", "def f():\n    return 1"),
    ("prose\n```python\ndef g(): pass\n```\n```python\ndef f(x):\n    return x\n```", "f", "def f(x):\n    return x"),
    ("```python\ndef f(:\n", "f", ""),  # truncated and invalid
    ("def f():\n    return 'é'", "f", "def f():\n    return 'é'"),  # bare code, unicode
])
def test_extract_code(text, entry, expected):
    assert parsing.extract_code(text, entry) == expected


# ---- sampling and budgets (aflow.operators.CallPolicy) -----------------------------------------

def test_repeated_requests_are_independent_seeded_samples_with_their_own_cache_entries(fake_openai, tmp_path):
    """An ensemble asks the same thing k times: at temperature 0 with a cache, that used to be one answer
    k times. The k-th repeat now carries temperature and seed k, and each has its own cache entry, so a
    second run replays all k samples from the cache."""
    from aflow.operators import CallPolicy

    fake_openai.reply = lambda messages, body: f"sample {body.get('seed')}"

    async def go():
        llm = LLMClient(LLMConfig(base_url=fake_openai.base_url, model="fake", cache_path=tmp_path / "c.sqlite"))
        try:
            runs = []
            for _ in range(2):
                ctx = OperatorContext(llm, policy=CallPolicy(sample_temperature=0.9))
                runs.append([await ctx.ask("Solve 2+2.") for _ in range(3)] + [await ctx.ask("Other.")])
            return runs, ctx.usage
        finally:
            await llm.close()

    (first, second), usage = asyncio.run(go())
    assert first == second == ["sample None", "sample 1", "sample 2", "sample None"]
    bodies = [r.body for r in fake_openai.chat_requests]
    assert [(b.get("temperature"), b.get("seed")) for b in bodies] == [(0.0, None), (0.9, 1), (0.9, 2), (0.0, None)]
    assert usage.cached == 4 and usage.calls == 0  # the second run: every sample from the cache


def test_a_run_over_its_call_budget_fails_whatever_the_workflow_does_with_the_refusal(fake_openai, tmp_path):
    from aflow.benchmarks import Problem, get_benchmark
    from aflow.evaluate import run_problem
    from aflow.operators import CallPolicy
    from aflow.sandbox import Sandbox
    from aflow.workflows import from_source

    graph = """from aflow_ops import Custom


class Workflow:
    def __init__(self):
        self.custom = Custom()

    async def __call__(self, problem):
        answer = ""
        for i in range(60):
            try:
                answer = (await self.custom(input=problem, instruction=f"try {i}"))["response"]
            except Exception:
                break
        return answer
"""
    fake_openai.reply = lambda messages: "4"
    problem = Problem(id="p", inputs={"problem": "2+2?"}, reference={"answer": "4"})

    async def go(policy):
        llm = LLMClient(LLMConfig(base_url=fake_openai.base_url, model="fake", cache_path=tmp_path / "c.sqlite"))
        try:
            async with Sandbox() as sandbox:
                return (await run_problem(get_benchmark("gsm8k"), problem, from_source(graph), llm, {}, sandbox,
                                          policy=policy))[0]
        finally:
            await llm.close()

    capped = asyncio.run(go(CallPolicy(max_calls=10)))
    assert capped.score == 0.0 and "call budget spent (10 calls" in capped.error
    assert fake_openai.count == 10
    tokens = asyncio.run(go(CallPolicy(max_tokens=30)))  # each call: 3 prompt words + 1 completion word
    assert tokens.score == 0.0 and "token budget spent (30 tokens" in tokens.error
    free = asyncio.run(go(CallPolicy()))  # no cap: 60 calls (10 of them cached), the answer right
    assert free.score == 1.0 and free.error is None and free.calls + free.cached_calls == 60
    assert free.cached_calls == 10 and free.cached_tokens == 10 * 4
