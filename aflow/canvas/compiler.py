"""Canvas -> AFlow-native `graph.py` and `prompt.py`, by trusted code generation.

Why generate ordinary workflow source: everything downstream (the static checks, the
sandbox, `run_problem`, the search tree, AFlow's round files) already speaks it, and a
canvas workflow then differs from a hand-written one in nothing but its origin.

Trust: the only text of the policy's is a step's prompt, and it reaches prompt.py as a
`repr()` string literal assigned to a name this module chooses (STEP<n>); graph.py is
assembled from fixed templates, step numbers and bounded integers. A prompt can therefore
never become code, whatever characters it holds (the grammar restricts them besides).

The generated code follows the builtins: `async def __call__(self, problem, entry_point)`
for code benchmarks, `(self, problem)` otherwise; one running `solution` threads the steps.
"""

from __future__ import annotations

import ast

from aflow.canvas.model import OPERATORS_OF, PROMPTABLE, Canvas, Step, canonical, from_canonical
from aflow.parsing import PARSE_ERRORS

# the operator attribute of each operator class, in a fixed order (deterministic output)
ATTRIBUTES = {
    "Custom": "custom", "AnswerGenerate": "answer_generate", "Programmer": "programmer",
    "CustomCodeGenerate": "custom_code_generate", "ScEnsemble": "sc_ensemble", "Review": "review",
    "Revise": "revise", "Test": "test", "Format": "format",
}
DRAFT = "\\n\\nDraft solution:\\n"  # the glue before a later step sees the solution so far (source text)


def _is_code(benchmark) -> bool:
    if isinstance(benchmark, bool):
        return benchmark
    if isinstance(benchmark, str):
        from aflow.benchmarks import get_benchmark

        return get_benchmark(benchmark).is_code
    return bool(benchmark.is_code)


def operators_used(canvas: Canvas) -> list[str]:
    used = set()
    for step in canvas.steps:
        used |= set(OPERATORS_OF[step.kind])
        if step.samples > 1:
            used.add("ScEnsemble")
    return [name for name in ATTRIBUTES if name in used]


def _source_text(first: bool) -> str:
    """The expression a generator step reads: the problem, then the draft solution so far."""
    return "problem" if first else f'problem + "{DRAFT}" + solution'


def _prefixed(step: Step, n: int, text: str) -> str:
    return f'prompt.STEP{n} + "\\n\\n" + {text}' if step.prompt else text


def _call(step: Step, n: int, first: bool) -> tuple[str, str]:
    """(the awaited call expression, the result key holding the new solution)."""
    text = _source_text(first)
    if step.kind == "CUSTOM":
        return f"self.custom(input={text}, instruction=prompt.STEP{n})", "response"
    if step.kind == "ANSWER":
        return f"self.answer_generate(input={_prefixed(step, n, text)})", "answer"
    if step.kind == "PROGRAM":
        analysis = '"None"' if first else "solution"
        return f"self.programmer(problem={_prefixed(step, n, 'problem')}, analysis={analysis})", "output"
    if step.kind == "CODE":
        return (f"self.custom_code_generate(problem={text}, entry_point=entry_point, "
                f"instruction=prompt.STEP{n})"), "response"
    raise AssertionError(step.kind)


def _step_lines(step: Step, n: int, first: bool) -> list[str]:
    lines = [f"# step {n}: {step.kind}"]
    if step.kind == "REVIEW":
        lines += [
            f"for _ in range({step.rounds}):",
            "    review = await self.review(problem=problem, solution=solution)",
            '    if review["review_result"]:',
            "        break",
            '    revised = await self.revise(problem=problem, solution=solution, feedback=review["feedback"])',
            '    solution = revised["solution"]',
        ]
    elif step.kind == "TEST":
        lines += [
            "tested = await self.test(problem=problem, solution=solution, entry_point=entry_point, "
            f"test_loop={step.rounds})",
            'solution = tested["solution"]',
        ]
    elif step.kind == "FORMAT":
        lines += ['solution = (await self.format(problem=problem, solution=solution))["response"]']
    elif step.samples > 1:
        call, key = _call(step, n, first)
        lines += [
            f"candidates = await asyncio.gather(*[{call} for _ in range({step.samples})])",
            f'solutions = [candidate["{key}"] for candidate in candidates]',
            'solution = (await self.sc_ensemble(solutions=solutions, problem=problem))["response"]',
        ]
    else:
        call, key = _call(step, n, first)
        lines += [f'solution = (await {call})["{key}"]']
    return lines


def compile_canvas(canvas: Canvas, benchmark) -> tuple[str, str]:
    """(graph_source, prompt_source) for `benchmark` (a name, a Benchmark, or is_code as a bool).
    Raises ValueError only when the benchmark's family is not the canvas's."""
    if not isinstance(canvas, Canvas):
        raise TypeError("compile_canvas takes a Canvas")
    code = _is_code(benchmark)
    if code != canvas.code:
        raise ValueError(f"a canvas for {'code' if canvas.code else 'answer'} benchmarks cannot be compiled for "
                         f"a {'code' if code else 'answer'} benchmark")
    used = operators_used(canvas)
    ensemble = any(step.samples > 1 for step in canvas.steps)
    graph = ['"""A canvas workflow (compiled from prompt.CANVAS; edit the canvas, not this file)."""']
    if ensemble:
        graph.append("import asyncio")
        graph.append("")
    graph += [f"from aflow_ops import {', '.join(used)}", "", "import prompt", "", "",
              "class Workflow:", "    def __init__(self):"]
    graph += [f"        self.{ATTRIBUTES[name]} = {name}()" for name in used]
    graph += ["", f"    async def __call__(self, problem{', entry_point' if code else ''}):",
              '        solution = ""']
    for n, step in enumerate(canvas.steps, 1):
        graph += ["        " + line for line in _step_lines(step, n, n == 1)]
    graph += ["        return solution", ""]
    # the canvas itself, as a literal, so a round's files alone give it back (canvas_of): the search tree and
    # AFlow's round folders need nothing else
    prompts = ['"""Prompts of a canvas workflow: plain string constants, one per promptable step."""',
               f"CANVAS = {canonical(canvas)!r}"]
    for n, step in enumerate(canvas.steps, 1):
        if step.kind in PROMPTABLE:
            prompts.append(f"STEP{n} = {step.prompt!r}")
    return "\n".join(graph), "\n".join(prompts) + "\n"


def canvas_of(graph: str, prompt: str) -> Canvas | None:
    """The canvas a workflow was compiled from, when (graph, prompt) is exactly what compile_canvas wrote
    for it (prompt.py's CANVAS recompiles to the same two files); None for any other workflow."""
    try:
        tree = ast.parse(prompt)
    except (*PARSE_ERRORS, TypeError):
        return None
    text = next((node.value.value for node in tree.body
                 if isinstance(node, ast.Assign) and len(node.targets) == 1
                 and getattr(node.targets[0], "id", None) == "CANVAS"
                 and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)), None)
    canvas = from_canonical(text) if text is not None else None
    if canvas is None or isinstance(canvas, str) or compile_canvas(canvas, canvas.code) != (graph, prompt):
        return None
    return canvas


compile = compile_canvas  # noqa: A001 - the name the brief asks for; compile_canvas avoids the shadowing
