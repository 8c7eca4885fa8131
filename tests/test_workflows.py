"""Workflows as code: static checks, builtin workflows, and AFlow's round format.

Loaded workflows are run through the real sandbox with a fake operator handler (no LLM),
or through `OperatorContext.call` with a fake executor. Async code is driven with
`asyncio.run` (pytest-asyncio is not a dependency).
"""

from __future__ import annotations

import asyncio
import re
import sys
import textwrap
from pathlib import Path

import pytest

from aflow.llm import Completion, Usage
from aflow.operators import OPERATOR_NAMES, OperatorContext
from aflow.sandbox import Limits, SandboxResult, run_workflow
from aflow.workflows import (
    GOLD,
    WorkflowCheckError,
    WorkflowCode,
    WorkflowNotFound,
    builtin_names,
    from_source,
    load_workflow,
)
from aflow.workflows.checks import ALLOWED_IMPORTS, check_source
from tests.samples import GRAPH

LIMITS = Limits(wall_seconds=10)
needs_linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the sandbox is Linux-only")

MINIMAL = """
class Workflow:
    async def __call__(self, problem):
        return problem
"""


def graph_with(body: str) -> str:
    """A valid workflow whose __call__ runs `body` (its first line is line 3)."""
    return ("class Workflow:\n    async def __call__(self, problem):\n"
            + textwrap.indent(textwrap.dedent(body).strip("\n"), "        ") + "\n")


class Recorder:
    """A fake operator handler: records calls, answers every one with the same reply."""

    def __init__(self, reply: dict):
        self.reply = reply
        self.calls: list[tuple[str, dict]] = []

    async def __call__(self, op: str, kwargs: dict):
        self.calls.append((op, kwargs))
        await asyncio.sleep(0)
        return dict(self.reply)


def run(code: WorkflowCode, inputs: dict, on_call, dataset: str = "") -> SandboxResult:
    return asyncio.run(run_workflow(code.graph, code.prompt, inputs, on_call, OPERATOR_NAMES, code.format,
                                    dataset, LIMITS))


# --------------------------------------------------------------------------- static checks


def test_minimal_workflow_passes():
    code = from_source(MINIMAL, "SOLVE = 'x'\n", name="mine")
    assert code == WorkflowCode(name="mine", graph=MINIMAL, prompt="SOLVE = 'x'\n", format="native")


def test_parse_error_names_the_line():
    with pytest.raises(WorkflowCheckError, match=r"^graph\.py does not parse: .* \(line 4\)$"):
        from_source("class Workflow:\n    async def __call__(self, problem):\n        x = 1\n        return (\n")


def test_parse_error_in_prompt_names_the_file_and_line():
    with pytest.raises(WorkflowCheckError, match=r"^prompt\.py does not parse: .* \(line 2\)$"):
        from_source(MINIMAL, "A = 'ok'\nB = 'unterminated\n")


@pytest.mark.parametrize(("source", "module", "line"), [
    ("import os\n", "os", 1),
    ("import subprocess\n", "subprocess", 1),
    ("import importlib\n", "importlib", 1),
    ("from importlib import import_module\n", "importlib", 1),
    ("import sys\n", "sys", 1),
    ("import ctypes\n", "ctypes", 1),
    ("import socket\n", "socket", 1),
    ("from os import path\n", "os", 1),
    ("import asyncio, os.path\n", "os.path", 1),
    ("from . import helpers\n", ".", 1),
    ("import json\n\n\ndef f():\n    import shutil\n", "shutil", 5),
])
def test_disallowed_import_is_rejected(source, module, line):
    with pytest.raises(WorkflowCheckError) as caught:
        from_source(source + MINIMAL)
    message = str(caught.value)
    assert message.startswith(f"graph.py:{line}: import of '{module}")
    assert "is not allowed" in message
    assert "typing" in message  # the message lists what is allowed


def test_allowed_imports_pass():
    imports = "".join(f"import {name}\n" for name in sorted(ALLOWED_IMPORTS - {"__future__", "aflow_ops", "prompt"}))
    source = "from __future__ import annotations\nfrom typing import Literal\n" + imports + \
             "from aflow_ops import Custom\nimport prompt\n" + MINIMAL
    assert from_source(source).graph == source


def test_disallowed_import_in_prompt_is_rejected():
    with pytest.raises(WorkflowCheckError, match=r"^prompt\.py:2: import of 'os' is not allowed"):
        from_source(MINIMAL, "SOLVE = 'x'\nimport os\n")


@pytest.mark.parametrize("name", ["eval", "exec", "compile", "open", "__import__", "globals", "locals", "vars",
                                  "getattr", "setattr", "delattr", "breakpoint", "input", "exit", "quit"])
def test_forbidden_name_is_rejected(name):
    with pytest.raises(WorkflowCheckError, match=rf"^graph\.py:3: use of '{re.escape(name)}' is not allowed$"):
        from_source(graph_with(f"return {name}('1')"))


@pytest.mark.parametrize(("expression", "dunder"), [
    ("().__class__", "__class__"),
    ("().__class__.__bases__[0].__subclasses__()", "__subclasses__"),
    ("problem.__globals__", "__globals__"),
    ("self.__dict__", "__dict__"),
    ("type(problem).__mro__", "__mro__"),
    ("__builtins__", "__builtins__"),
    ("__loader__", "__loader__"),
])
def test_dunder_access_is_rejected(expression, dunder):
    with pytest.raises(WorkflowCheckError) as caught:
        from_source(graph_with(f"return {expression}"))
    message = str(caught.value)
    assert message.startswith("graph.py:3: ")
    assert f"'{dunder}' is not allowed" in message


def test_import_trick_via_dunder_import_is_rejected():
    with pytest.raises(WorkflowCheckError, match=r"use of '__import__' is not allowed"):
        from_source(graph_with("__import__('os').system('id')"))


def test_import_trick_via_importlib_is_rejected():
    source = "import importlib\n" + graph_with("importlib.import_module('os').system('id')")
    with pytest.raises(WorkflowCheckError, match=r"^graph\.py:1: import of 'importlib' is not allowed"):
        from_source(source)


def test_allowed_dunders_pass():
    source = """
class Workflow:
    def __init__(self):
        self.name = type(self).__name__

    async def __call__(self, problem):
        return self.__call__.__name__
"""
    assert from_source(source).format == "native"


def test_global_statement_is_rejected():
    with pytest.raises(WorkflowCheckError, match=r"^graph\.py:3: global/nonlocal statements are not allowed$"):
        from_source(graph_with("global counter\ncounter = 1"))


def test_missing_workflow_class_is_rejected():
    with pytest.raises(WorkflowCheckError, match=r"^graph\.py: no class Workflow is defined$"):
        from_source("class Flow:\n    async def __call__(self, problem):\n        return problem\n")


def test_nested_workflow_class_does_not_count():
    source = "def make():\n    class Workflow:\n        async def __call__(self, problem):\n            return 1\n"
    with pytest.raises(WorkflowCheckError, match=r"no class Workflow is defined"):
        from_source(source)


def test_sync_call_is_rejected():
    with pytest.raises(WorkflowCheckError, match=r"^graph\.py: class Workflow has no 'async def __call__"):
        from_source("class Workflow:\n    def __call__(self, problem):\n        return problem\n")


def test_workflow_without_call_is_rejected():
    with pytest.raises(WorkflowCheckError, match=r"class Workflow has no 'async def __call__"):
        from_source("class Workflow:\n    def __init__(self):\n        pass\n")


def test_prompt_does_not_need_a_workflow():
    tree = check_source("SOLVE = 'Solve it.'\n", "prompt.py", require_workflow=False)
    assert tree.body


def test_oversized_source_is_rejected():
    with pytest.raises(WorkflowCheckError, match="larger than 1 MB"):
        from_source(MINIMAL + "#" * 1_000_001)


def test_check_error_is_a_value_error():
    assert issubclass(WorkflowCheckError, ValueError)


# --------------------------------------------------------------------------- builtins


def test_builtin_names():
    assert {"io", "cot", "gold"} <= set(builtin_names())


@pytest.mark.parametrize("name", ["io", "cot", "gold"])
def test_builtin_loads(name):
    code = load_workflow(f"builtin:{name}")
    assert code.name == f"builtin:{name}"
    assert code.format == "native"
    assert "class Workflow" in code.graph
    assert code.prompt  # each builtin ships a prompt.py


def test_unknown_builtin_raises_not_found():
    with pytest.raises(WorkflowNotFound, match=r"unknown builtin workflow 'nope' \(choose from: .*cot.*gold.*io"):
        load_workflow("builtin:nope")
    assert issubclass(WorkflowNotFound, FileNotFoundError)


def test_directory_without_graph_raises_not_found(tmp_path):
    (tmp_path / "prompt.py").write_text("SOLVE = 'x'\n")
    with pytest.raises(WorkflowNotFound, match="has no graph.py"):
        load_workflow(str(tmp_path))


def test_directory_workflow_without_prompt(tmp_path):
    (tmp_path / "graph.py").write_text(MINIMAL)
    code = load_workflow(str(tmp_path))
    assert code.prompt == ""
    assert code.name == str(tmp_path)


def test_bad_directory_workflow_raises_check_error(tmp_path):
    (tmp_path / "graph.py").write_text("import os\n" + MINIMAL)
    with pytest.raises(WorkflowCheckError, match="import of 'os'"):
        load_workflow(str(tmp_path))


@needs_linux
def test_gold_returns_the_reference():
    code = load_workflow(GOLD)
    result = run(code, {"problem": "2+2?", "gold": "4", "entry_point": None}, Recorder({}))
    assert result.ok, result.error
    assert result.value == "4"


@needs_linux
def test_io_answers_with_the_answer_prompt():
    code = load_workflow("builtin:io")
    handler = Recorder({"response": "The answer is 4."})
    result = run(code, {"problem": "2+2?"}, handler)
    assert result.ok, result.error
    assert result.value == "The answer is 4."
    assert handler.calls == [("Custom", {"input": "2+2?",
                                         "instruction": "Answer the question. End with the final answer."})]


@needs_linux
def test_io_uses_the_code_prompt_for_code_problems():
    code = load_workflow("builtin:io")
    handler = Recorder({"response": "def add(a, b):\n    return a + b"})
    result = run(code, {"problem": "def add(a, b):", "entry_point": "add"}, handler)
    assert result.ok, result.error
    assert result.value == "def add(a, b):\n    return a + b"
    assert handler.calls[0][1]["instruction"].startswith("Complete the Python function.")


@needs_linux
def test_cot_routes_code_problems_to_code_generation():
    code = load_workflow("builtin:cot")
    handler = Recorder({"response": "def add(a, b):\n    return a + b", "answer": "unused"})
    result = run(code, {"problem": "def add(a, b):", "entry_point": "add"}, handler)
    assert result.ok, result.error
    assert [op for op, _ in handler.calls] == ["CustomCodeGenerate"]
    assert handler.calls[0][1]["entry_point"] == "add"
    assert handler.calls[0][1]["instruction"] == "Think about the edge cases first, then write the function."

    handler = Recorder({"thought": "2 and 2", "answer": "4"})
    result = run(code, {"problem": "2+2?"}, handler)
    assert result.ok, result.error
    assert result.value == "4"
    assert handler.calls == [("AnswerGenerate", {"input": "Solve the problem step by step.\n\n2+2?"})]


# --------------------------------------------------------------------------- OperatorContext.call


class FakeLLM:
    """The executor as OperatorContext sees it: `chat(messages, usage=...)`."""

    def __init__(self, text: str):
        self.text = text
        self.prompts: list[str] = []

    async def chat(self, messages, usage=None, **_overrides):
        self.prompts.append(messages[-1]["content"])
        if usage is not None:
            usage.calls += 1
        return Completion(text=self.text, prompt_tokens=3, completion_tokens=1, cost_usd=0.0, cached=False)


def test_operator_context_dispatches_by_name():
    llm = FakeLLM("42")
    ctx = OperatorContext(llm)
    reply = asyncio.run(ctx.call("Custom", {"input": "6*7?", "instruction": "Answer."}))
    assert reply == {"response": "42"}
    assert llm.prompts == ["Answer.\n\n6*7?"]
    assert ctx.usage.calls == 1


def test_operator_context_rejects_unknown_operator_and_bad_arguments():
    ctx = OperatorContext(FakeLLM("x"))
    with pytest.raises(ValueError, match=r"^unknown operator 'Nope'"):
        asyncio.run(ctx.call("Nope", {}))
    with pytest.raises(TypeError, match=r"^Custom\(input: str, instruction: str\).*'prompt'"):
        asyncio.run(ctx.call("Custom", {"input": "x", "prompt": "y"}))


@needs_linux
def test_builtin_io_through_sandbox_and_operator_context():
    llm = FakeLLM("Paris")
    usage = Usage()
    ctx = OperatorContext(llm, usage)
    result = run(load_workflow("builtin:io"), {"problem": "Capital of France?"}, ctx.call)
    assert result.ok, result.error
    assert result.value == "Paris"
    assert usage.calls == 1
    assert llm.prompts == ["Answer the question. End with the final answer.\n\nCapital of France?"]


@needs_linux
def test_operator_argument_error_reaches_the_workflow():
    source = """
from aflow_ops import Custom


class Workflow:
    async def __call__(self, problem):
        try:
            await Custom()(input=problem, prompt=problem)
        except RuntimeError as exc:
            return str(exc)
        return "no error"
"""
    result = run(from_source(source), {"problem": "q"}, OperatorContext(FakeLLM("x")).call)
    assert result.ok, result.error
    assert result.value.startswith("TypeError: Custom(input: str, instruction: str)")
    assert "unexpected keyword argument 'prompt'" in result.value


# --------------------------------------------------------------------------- AFlow round format


AFLOW_GSM8K_GRAPH = '''from typing import Literal
import workspace.GSM8K.workflows.template.operator as operator
import workspace.GSM8K.workflows.round_3.prompt as prompt_custom
from metagpt.provider.llm_provider_registry import create_llm_instance
from metagpt.utils.cost_manager import CostManager

DatasetType = Literal["HumanEval", "MBPP", "GSM8K", "MATH", "HotpotQA", "DROP"]

class Workflow:
    def __init__(self, name: str, llm_config, dataset: DatasetType) -> None:
        self.name = name
        self.dataset = dataset
        self.llm = create_llm_instance(llm_config)
        self.llm.cost_manager = CostManager()
        self.custom = operator.Custom(self.llm)
        self.sc_ensemble = operator.ScEnsemble(self.llm)

    async def __call__(self, problem: str):
        solutions = []
        for _ in range(3):
            s = await self.custom(input=problem, instruction=prompt_custom.SOLVE_PROMPT)
            solutions.append(s['response'])
        final = await self.sc_ensemble(solutions=solutions, problem=problem)
        return final['response'], self.llm.cost_manager.total_cost
'''

AFLOW_GSM8K_PROMPT = '''SOLVE_PROMPT = """
Solve the math problem step by step. Put the final numeric answer at the end.
"""
'''

AFLOW_HUMANEVAL_GRAPH = '''from typing import Literal
import workspace.HumanEval.workflows.template.operator as operator
import workspace.HumanEval.workflows.round_2.prompt as prompt_custom
from metagpt.provider.llm_provider_registry import create_llm_instance
from metagpt.utils.cost_manager import CostManager

DatasetType = Literal["HumanEval", "MBPP", "GSM8K", "MATH", "HotpotQA", "DROP"]

class Workflow:
    def __init__(self, name: str, llm_config, dataset: DatasetType) -> None:
        self.name = name
        self.dataset = dataset
        self.llm = create_llm_instance(llm_config)
        self.llm.cost_manager = CostManager()
        self.custom_code_generate = operator.CustomCodeGenerate(self.llm)

    async def __call__(self, problem: str, entry_point: str):
        solution = await self.custom_code_generate(problem=problem, entry_point=entry_point,
                                                   instruction=prompt_custom.CODE_PROMPT)
        return solution['response'], self.llm.cost_manager.total_cost
'''


@pytest.fixture
def gsm8k_round(tmp_path) -> Path:
    directory = tmp_path / "round_3"
    directory.mkdir()
    (directory / "graph.py").write_text(AFLOW_GSM8K_GRAPH)
    (directory / "prompt.py").write_text(AFLOW_GSM8K_PROMPT)
    return directory


def test_aflow_round_is_detected_and_converted(gsm8k_round):
    code = load_workflow(str(gsm8k_round))
    assert code.format == "aflow"
    assert "workspace" not in code.graph
    assert "metagpt" not in code.graph
    assert "import aflow_ops as operator" in code.graph
    assert "import prompt as prompt_custom" in code.graph
    assert "from aflow_ops import create_llm_instance" in code.graph
    assert "from aflow_ops import CostManager" in code.graph
    assert code.prompt == AFLOW_GSM8K_PROMPT
    check_source(code.graph, "graph.py", require_workflow=True)  # the converted file passes the checks


def test_aflow_round_with_disallowed_import_is_still_rejected(tmp_path):
    (tmp_path / "graph.py").write_text("import os\n" + AFLOW_GSM8K_GRAPH)
    (tmp_path / "prompt.py").write_text(AFLOW_GSM8K_PROMPT)
    with pytest.raises(WorkflowCheckError, match=r"import of 'os' is not allowed"):
        load_workflow(str(tmp_path))


@needs_linux
def test_aflow_round_runs_in_sandbox(gsm8k_round):
    code = load_workflow(str(gsm8k_round))
    handler = Recorder({"response": "42"})
    result = run(code, {"problem": "What is 6*7?"}, handler, dataset="GSM8K")
    assert result.ok, result.error
    assert result.value == "42"  # the answer, not the (answer, cost) tuple
    assert [op for op, _ in handler.calls] == ["Custom"] * 3 + ["ScEnsemble"]
    solve_prompt = "\nSolve the math problem step by step. Put the final numeric answer at the end.\n"
    for _op, kwargs in handler.calls[:3]:
        assert kwargs == {"input": "What is 6*7?", "instruction": solve_prompt}
    assert handler.calls[3][1] == {"solutions": ["42", "42", "42"], "problem": "What is 6*7?"}


@needs_linux
def test_aflow_humaneval_round_receives_entry_point(tmp_path):
    (tmp_path / "graph.py").write_text(AFLOW_HUMANEVAL_GRAPH)
    (tmp_path / "prompt.py").write_text("CODE_PROMPT = 'Write the function.'\n")
    code = load_workflow(str(tmp_path))
    assert code.format == "aflow"
    handler = Recorder({"response": "def add(a, b):\n    return a + b\n"})
    result = run(code, {"problem": "def add(a, b):\n    \"\"\"Add.\"\"\"\n", "entry_point": "add"}, handler,
                 dataset="HumanEval")
    assert result.ok, result.error
    assert result.value == "def add(a, b):\n    return a + b\n"
    assert handler.calls == [("CustomCodeGenerate", {"problem": "def add(a, b):\n    \"\"\"Add.\"\"\"\n",
                                                     "entry_point": "add", "instruction": "Write the function."})]


@needs_linux
def test_aflow_llm_object_is_callable():
    source = AFLOW_GSM8K_GRAPH.replace(
        "        solutions = []\n",
        "        direct = await self.llm(problem)\n        return direct, 0.0\n        solutions = []\n")
    code = from_source(source, AFLOW_GSM8K_PROMPT)
    handler = Recorder({"response": "7"})
    result = run(code, {"problem": "3+4?"}, handler)
    assert result.ok, result.error
    assert result.value == "7"
    assert handler.calls == [("Custom", {"input": "3+4?", "instruction": ""})]


AFLOW_SCRIPTS_GRAPH = '''from typing import Literal
import workspace.HotpotQA.workflows.template.operator as operator
import workspace.HotpotQA.workflows.round_1.prompt as prompt_custom
from scripts.async_llm import create_llm_instance

from scripts.evaluator import DatasetType


class Workflow:
    def __init__(self, name: str, llm_config, dataset: DatasetType) -> None:
        self.name = name
        self.dataset = dataset
        self.llm = create_llm_instance(llm_config)
        self.custom = operator.Custom(self.llm)

    async def __call__(self, problem: str):
        solution = await self.custom(input=problem, instruction=prompt_custom.SOLVE_PROMPT)
        return solution["response"], self.llm.get_usage_summary()["total_cost"]
'''


@needs_linux
def test_aflow_scripts_style_round_runs():
    code = from_source(AFLOW_SCRIPTS_GRAPH, "SOLVE_PROMPT = 'Answer.'\n")
    handler = Recorder({"response": "Paris"})
    result = run(code, {"problem": "Capital of France?"}, handler, dataset="HotpotQA")
    assert result.ok, result.error
    assert result.value == "Paris"


# ---- behavioural identity (aflow.workflows.identity) ---------------------------------------------

IDENTITY_GRAPH = GRAPH  # tests.samples: one Custom call with prompt.STYLE
IDENTITY_PROMPT = 'STYLE = "Solve it step by step."\n'


@pytest.mark.parametrize("graph,prompt", [
    (IDENTITY_GRAPH.replace("class Workflow:", "class Workflow:\n    # a comment only"), IDENTITY_PROMPT),
    (IDENTITY_GRAPH.replace("class Workflow:", 'class Workflow:\n    """A docstring only."""'), IDENTITY_PROMPT),
    (IDENTITY_GRAPH.replace("\n\n\nclass", "\n\n\n\n\nclass"), IDENTITY_PROMPT + "\n\n"),
    (IDENTITY_GRAPH.replace("result", "reply"), IDENTITY_PROMPT),  # a renamed local
    (IDENTITY_GRAPH, 'STYLE = "Solve it   step by step. "\n'),  # whitespace inside the prompt
    (IDENTITY_GRAPH, 'STYLE = (\n    "Solve it "\n    "step by step."\n)\n'),  # the same string, reflowed
])
def test_cosmetic_variants_have_one_behaviour_hash(graph, prompt):
    from aflow.workflows.identity import behaviour_hash

    assert behaviour_hash(graph, prompt) == behaviour_hash(IDENTITY_GRAPH, IDENTITY_PROMPT)


@pytest.mark.parametrize("graph,prompt", [
    (IDENTITY_GRAPH, 'STYLE = "Solve it step by step, carefully."\n'),  # the executor reads other words
    (IDENTITY_GRAPH.replace("Custom", "AnswerGenerate").replace('["response"]', '["answer"]')
     .replace(", instruction=prompt.STYLE", ""), IDENTITY_PROMPT),  # another operator
    (IDENTITY_GRAPH.replace("instruction=prompt.STYLE", "instruction=prompt.STYLE + problem"), IDENTITY_PROMPT),
    (IDENTITY_GRAPH.replace("(self, problem)", "(self, question)").replace("input=problem", "input=question"),
     IDENTITY_PROMPT),  # an argument's name is part of the interface (the sandbox may pass it by keyword)
])
def test_behavioural_changes_change_the_hash(graph, prompt):
    from aflow.workflows.identity import behaviour_hash

    assert behaviour_hash(graph, prompt) != behaviour_hash(IDENTITY_GRAPH, IDENTITY_PROMPT)
