"""AFlow's operators, run on the trusted side on behalf of a (sandboxed) workflow.

A workflow calls `await self.custom(input=..., instruction=...)`; the sandbox forwards the
call here. Each operator returns a dict (the same keys AFlow's operators return) and never
raises on malformed LLM text: it falls back to the raw text or reports a failure field.
`CATALOGUE` is the text an optimizer reads to know what it can compose.
"""

from __future__ import annotations

import inspect
import random
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aflow import parsing
from aflow.llm import LLMClient, Usage
from aflow.sandbox import CODE_LIMITS, Limits, Sandbox


@dataclass(frozen=True)
class CallPolicy:
    """How a workflow run may use the executor.

    `sample_temperature`: the k-th repeat (k >= 1) of a request already sent in the same run is sent
    with this temperature and `seed=k`, both part of the response cache's key, so the members of an
    ensemble (three Custom calls with one prompt, then ScEnsemble) are independent samples instead of
    one cached answer three times; the first request keeps the endpoint's own settings.
    `max_calls` / `max_tokens`: per run, cache hits included (a cached answer still stands for a call);
    the request past either fails, and the run is recorded as a failure (`OperatorContext.over_budget`)."""

    sample_temperature: float = 0.7
    max_calls: int | None = None
    max_tokens: int | None = None


class BudgetExceeded(RuntimeError):
    """A workflow run asked the executor for more than its `CallPolicy` allows."""


@dataclass(frozen=True)
class OperatorSpec:
    name: str
    description: str
    interface: str
    run: Callable[..., Awaitable[dict]]


class OperatorContext:
    """What operators share during one workflow run: the executor, the problem's usage,
    public tests for the Test operator, and the sandbox limits for code."""

    def __init__(self, llm: LLMClient, usage: Usage | None = None, public_tests: dict | None = None,
                 code_limits: Limits = CODE_LIMITS, seed: int = 0, sandbox: Sandbox | None = None,
                 policy: CallPolicy = CallPolicy(), transcript: list[str] | None = None):
        self.llm = llm  # anything with LLMClient.chat's signature (the environment's replay executor too)
        self.sandbox = sandbox or Sandbox(use_zygote=False)
        self.usage = usage if usage is not None else Usage()
        self.public_tests = public_tests or {}
        self.code_limits = code_limits
        self.rng = random.Random(seed)
        self.policy = policy
        self.transcript = transcript  # when given, every reply is appended to it, in order
        self.asked: Counter = Counter()
        self.calls = self.tokens = 0
        self.over_budget: str | None = None  # why the run went over its CallPolicy, once it has

    async def ask(self, prompt: str) -> str:
        self._charge_call()
        repeat = self.asked[prompt]
        self.asked[prompt] += 1
        overrides = {"temperature": self.policy.sample_temperature, "seed": repeat} if repeat else {}
        completion = await self.llm.chat([{"role": "user", "content": prompt}], usage=self.usage, **overrides)
        self.tokens += completion.prompt_tokens + completion.completion_tokens
        if self.transcript is not None:
            self.transcript.append(completion.text)
        return completion.text

    def _charge_call(self) -> None:
        limit_calls, limit_tokens = self.policy.max_calls, self.policy.max_tokens
        if self.over_budget is None and limit_calls is not None and self.calls >= limit_calls:
            self.over_budget = f"executor call budget spent ({limit_calls} calls per run)"
        if self.over_budget is None and limit_tokens is not None and self.tokens >= limit_tokens:
            self.over_budget = f"executor token budget spent ({limit_tokens} tokens per run)"
        if self.over_budget is not None:
            raise BudgetExceeded(self.over_budget)
        self.calls += 1

    async def call(self, name: str, kwargs: dict) -> dict:
        """Dispatch one operator call by name, checking its arguments first."""
        spec = OPERATORS.get(name)
        if spec is None:
            raise ValueError(f"unknown operator '{name}' (known: {', '.join(OPERATORS)})")
        signature = inspect.signature(spec.run)
        try:
            bound = signature.bind(self, **kwargs)
        except TypeError as exc:
            raise TypeError(f"{name}{spec.interface}: {exc}") from None
        return await spec.run(*bound.args, **bound.kwargs)


def _lettered(solutions: list[str]) -> str:
    return "\n\n".join(f"{chr(65 + i)}:\n{s}" for i, s in enumerate(solutions))


async def custom(ctx: OperatorContext, input: str, instruction: str = "") -> dict:
    return {"response": await ctx.ask(f"{instruction}\n\n{input}".strip())}


async def answer_generate(ctx: OperatorContext, input: str) -> dict:
    text = await ctx.ask(
        f"{input}\n\nThink it through, then give the final answer alone.\n"
        "Reply as <thought>your reasoning</thought><answer>the final answer</answer>."
    )
    thought = parsing.extract_tag(text, "thought") or ""
    answer = parsing.extract_tag(text, "answer")
    if answer is None:
        lines = [line for line in text.strip().splitlines() if line.strip()]
        answer = lines[-1] if lines else ""
    return {"thought": thought, "answer": answer}


async def custom_code_generate(ctx: OperatorContext, problem: str, entry_point: str, instruction: str = "") -> dict:
    text = await ctx.ask(
        f"{instruction}\n\n{problem}\n\nWrite a complete, self-contained Python function `{entry_point}` "
        "with any imports it needs, in one ```python block."
    )
    return {"response": parsing.extract_code(text, entry_point) or text}


async def sc_ensemble(ctx: OperatorContext, solutions: list, problem: str) -> dict:
    solutions = [str(s) for s in solutions] or [""]
    if len(solutions) == 1:
        return {"response": solutions[0]}
    text = await ctx.ask(
        f"Problem:\n{problem}\n\nCandidate solutions:\n{_lettered(solutions)}\n\n"
        "Which answer do most candidates agree on? Reply as <solution_letter>X</solution_letter>."
    )
    index = parsing.extract_letter(text, len(solutions))
    if index is None:  # fall back to the most frequent candidate
        index = solutions.index(Counter(s.strip() for s in solutions).most_common(1)[0][0].strip()) \
            if any(s.strip() for s in solutions) else 0
    return {"response": solutions[index]}


async def md_ensemble(ctx: OperatorContext, solutions: list, problem: str, mode: str | None = None,
                      vote_count: int = 3) -> dict:
    solutions = [str(s) for s in solutions] or [""]
    votes: Counter = Counter()
    for _ in range(max(1, vote_count)):
        order = list(range(len(solutions)))
        ctx.rng.shuffle(order)
        shuffled = [solutions[i] for i in order]
        text = await ctx.ask(
            f"Problem:\n{problem}\n\nCandidate solutions:\n{_lettered(shuffled)}\n\n"
            "Which single candidate is best? Reply as <solution_letter>X</solution_letter>."
        )
        pick = parsing.extract_letter(text, len(shuffled))
        if pick is not None:
            votes[order[pick]] += 1
    best = votes.most_common(1)[0][0] if votes else 0
    return {"solution": solutions[best]}


async def programmer(ctx: OperatorContext, problem: str, analysis: str = "None", attempts: int = 3) -> dict:
    feedback = ""
    code, output = "", ""
    for _ in range(max(1, attempts)):
        text = await ctx.ask(
            f"Problem:\n{problem}\n\nAnalysis:\n{analysis}\n{feedback}\n"
            "Write Python code defining `solve()` that computes and returns the answer. "
            "Use only the standard library. Put the code in one ```python block."
        )
        code = parsing.extract_code(text, "solve")
        if not code:
            feedback = "\nYour previous reply had no valid Python code defining solve()."
            continue
        result = await ctx.sandbox.run_code(code, "solve", ctx.code_limits)
        if result.ok:
            return {"code": code, "output": "" if result.value is None else str(result.value)}
        output = f"error: {result.error}"
        feedback = f"\nYour previous code:\n```python\n{code}\n```\nfailed with: {result.error}\nFix it."
    return {"code": code, "output": output}


async def test(ctx: OperatorContext, problem: str, solution: str, entry_point: str, test_loop: int = 3) -> dict:
    asserts = ctx.public_tests.get(entry_point, [])
    for _ in range(max(1, test_loop)):
        checks = "\n".join(f"    {a}" for a in asserts) or "    pass"
        program = f"{solution}\n\ndef _public_check(candidate):\n{checks}\n\n_public_check({entry_point})\n"
        result = await ctx.sandbox.run_code(program, None, ctx.code_limits)
        if result.ok:
            return {"result": True, "solution": solution}
        text = await ctx.ask(
            f"Problem:\n{problem}\n\nThis solution:\n```python\n{solution}\n```\nfails: {result.error}\n"
            f"Write a corrected complete function `{entry_point}` in one ```python block."
        )
        solution = parsing.extract_code(text, entry_point) or solution
    return {"result": False, "solution": solution}


async def format_(ctx: OperatorContext, problem: str, solution: str) -> dict:
    text = await ctx.ask(
        f"Problem:\n{problem}\n\nSolution:\n{solution}\n\n"
        "Give only the final answer, as short as possible, with no explanation."
    )
    return {"response": text.strip()}


async def review(ctx: OperatorContext, problem: str, solution: str) -> dict:
    text = await ctx.ask(
        f"Problem:\n{problem}\n\nSolution:\n{solution}\n\nIs this solution correct? Check it carefully. "
        "Reply as <review_result>true or false</review_result><feedback>what is wrong, or why it is right</feedback>."
    )
    verdict = parsing.extract_bool(parsing.extract_tag(text, "review_result"))
    if verdict is None:
        verdict = parsing.extract_bool(text)
    return {"review_result": bool(verdict), "feedback": parsing.extract_tag(text, "feedback") or text.strip()}


async def revise(ctx: OperatorContext, problem: str, solution: str, feedback: str) -> dict:
    text = await ctx.ask(
        f"Problem:\n{problem}\n\nSolution:\n{solution}\n\nReview feedback:\n{feedback}\n\n"
        "Write the corrected solution. Reply as <solution>the full corrected solution</solution>."
    )
    return {"solution": parsing.extract_tag(text, "solution") or text.strip()}


OPERATORS: dict[str, OperatorSpec] = {
    spec.name: spec
    for spec in (
        OperatorSpec("Custom", "Answers the input with the given instruction as its prompt; the building block.",
                     "(input: str, instruction: str) -> {'response': str}", custom),
        OperatorSpec("AnswerGenerate", "Reasons step by step and separates the final answer from the reasoning.",
                     "(input: str) -> {'thought': str, 'answer': str}", answer_generate),
        OperatorSpec("CustomCodeGenerate", "Writes a complete Python function for a coding problem.",
                     "(problem: str, entry_point: str, instruction: str) -> {'response': str}", custom_code_generate),
        OperatorSpec("ScEnsemble", "Self-consistency: picks the answer most candidate solutions agree on.",
                     "(solutions: list[str], problem: str) -> {'response': str}", sc_ensemble),
        OperatorSpec("MdEnsemble", "Picks the best candidate by majority over several shuffled comparisons.",
                     "(solutions: list[str], problem: str) -> {'solution': str}", md_ensemble),
        OperatorSpec("Programmer", "Writes and runs Python (sandboxed) to compute an answer; retries on errors.",
                     "(problem: str, analysis: str) -> {'code': str, 'output': str}", programmer),
        OperatorSpec("Test", "Runs a code solution against the public tests and repairs it on failure.",
                     "(problem: str, solution: str, entry_point: str) -> {'result': bool, 'solution': str}", test),
        OperatorSpec("Format", "Reduces a worked solution to the bare final answer.",
                     "(problem: str, solution: str) -> {'response': str}", format_),
        OperatorSpec("Review", "Judges whether a solution is correct and explains why.",
                     "(problem: str, solution: str) -> {'review_result': bool, 'feedback': str}", review),
        OperatorSpec("Revise", "Rewrites a solution according to review feedback.",
                     "(problem: str, solution: str, feedback: str) -> {'solution': str}", revise),
    )
}

OPERATOR_NAMES = list(OPERATORS)


def catalogue(names: list[str] | None = None) -> str:
    """The operator descriptions an optimizer reads."""
    lines = []
    for name in names or OPERATOR_NAMES:
        spec = OPERATORS[name]
        lines.append(f"- {spec.name}{spec.interface}: {spec.description}")
    return "\n".join(lines)

