"""Workflows as code: a directory with `graph.py` (class Workflow) and `prompt.py`.

A native graph imports its operators from `aflow_ops` and prompts from `prompt`:

    from aflow_ops import Custom, ScEnsemble
    import prompt

    class Workflow:
        def __init__(self):
            self.custom = Custom()
        async def __call__(self, problem, entry_point=None):
            return (await self.custom(input=problem, instruction=prompt.SOLVE))["response"]

Code benchmarks also pass `entry_point` when `__call__` accepts it. AFlow's own round
files load too (see `adapter`). Everything is checked statically here and then runs
only inside the sandbox.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

from aflow.parsing import PARSE_ERRORS
from aflow.workflows import adapter
from aflow.workflows.checks import WorkflowCheckError, check_source

BUILTIN_DIR = Path(__file__).with_name("builtin")
GOLD = "builtin:gold"


class WorkflowNotFound(FileNotFoundError):
    """The workflow spec names nothing that exists (a set-up error, unlike bad code)."""


@dataclass(frozen=True)
class WorkflowCode:
    name: str
    graph: str
    prompt: str
    format: str = "native"  # or "aflow" (constructed with (name, llm_config, dataset), returns (answer, cost))


def builtin_names() -> list[str]:
    return sorted(p.name for p in BUILTIN_DIR.iterdir() if (p / "graph.py").is_file())


def from_source(graph: str, prompt: str = "", name: str = "workflow") -> WorkflowCode:
    """Check (and if needed convert) workflow source; raises WorkflowCheckError with the reason."""
    if len(graph) > 1_000_000 or len(prompt) > 1_000_000:
        raise WorkflowCheckError("workflow source is larger than 1 MB")
    try:
        fmt = "aflow" if adapter.is_aflow_format(ast.parse(graph)) else "native"
    except PARSE_ERRORS:
        fmt = "native"  # check_source reports the syntax error with its line
    if fmt == "aflow":
        graph = adapter.convert(graph)
    check_source(graph, "graph.py", require_workflow=True)
    check_source(prompt, "prompt.py", require_workflow=False)
    return WorkflowCode(name=name, graph=graph, prompt=prompt, format=fmt)


def load_workflow(spec: str) -> WorkflowCode:
    """`builtin:NAME` or a directory holding graph.py (and optionally prompt.py)."""
    if spec.startswith("builtin:"):
        name = spec.split(":", 1)[1]
        directory = BUILTIN_DIR / name
        if not (directory / "graph.py").is_file():
            raise WorkflowNotFound(f"unknown builtin workflow '{name}' (choose from: {', '.join(builtin_names())})")
    else:
        directory = Path(spec)
        if not (directory / "graph.py").is_file():
            raise WorkflowNotFound(f"workflow directory {directory} has no graph.py")
    prompt_file = directory / "prompt.py"
    prompt = prompt_file.read_text(encoding="utf-8") if prompt_file.is_file() else ""
    return from_source((directory / "graph.py").read_text(encoding="utf-8"), prompt, name=spec)


__all__ = ["GOLD", "WorkflowCheckError", "WorkflowNotFound", "WorkflowCode", "from_source", "load_workflow"]
