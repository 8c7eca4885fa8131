"""Static checks a workflow must pass before it is run (the sandbox is the real barrier;
these turn the common mistakes and obvious escapes into clear, early messages)."""

from __future__ import annotations

import ast

from aflow.parsing import PARSE_ERRORS

ALLOWED_IMPORTS = frozenset({
    "aflow_ops", "prompt", "asyncio", "re", "json", "math", "typing", "collections", "itertools",
    "functools", "random", "string", "dataclasses", "statistics", "textwrap", "__future__",
})
FORBIDDEN_NAMES = frozenset({
    "eval", "exec", "compile", "open", "__import__", "globals", "locals", "vars", "getattr", "setattr",
    "delattr", "breakpoint", "input", "memoryview", "help", "exit", "quit",
})
ALLOWED_DUNDERS = frozenset({"__init__", "__call__", "__name__", "__future__"})
# Attributes that lead from an allowed module to the interpreter's internals
# (e.g. asyncio.base_events.sys.modules['posix']).
FORBIDDEN_ATTRIBUTES = frozenset({
    "sys", "modules", "os", "_os", "posix", "builtins", "subprocess", "socket", "_socket", "importlib",
    "f_globals", "f_locals", "f_back", "gi_frame", "cr_frame", "ag_frame", "tb_frame",
})


class WorkflowCheckError(ValueError):
    """The workflow code is rejected; the message says where and why."""


def check_source(source: str, filename: str, require_workflow: bool) -> ast.Module:
    try:
        tree = ast.parse(source, filename=filename)
    except SyntaxError as exc:
        raise WorkflowCheckError(f"{filename} does not parse: {exc.msg} (line {exc.lineno})") from None
    except PARSE_ERRORS as exc:  # nesting deeper than the parser's stack, a null byte
        raise WorkflowCheckError(f"{filename} does not parse: {type(exc).__name__} {exc}".rstrip()) from None
    for node in ast.walk(tree):
        line = getattr(node, "lineno", "?")
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or ""] if node.level == 0 else ["." * node.level + (node.module or "")]
        else:
            names = []
        for name in names:
            if name.split(".")[0] not in ALLOWED_IMPORTS:
                raise WorkflowCheckError(f"{filename}:{line}: import of '{name}' is not allowed "
                                         f"(allowed: {', '.join(sorted(ALLOWED_IMPORTS - {'__future__'}))})")
        if isinstance(node, ast.Name) and (node.id in FORBIDDEN_NAMES or _is_bad_dunder(node.id)):
            raise WorkflowCheckError(f"{filename}:{line}: use of '{node.id}' is not allowed")
        if isinstance(node, ast.Attribute) and (_is_bad_dunder(node.attr) or node.attr in FORBIDDEN_ATTRIBUTES):
            raise WorkflowCheckError(f"{filename}:{line}: access to '{node.attr}' is not allowed")
        if isinstance(node, (ast.Global, ast.Nonlocal)):
            raise WorkflowCheckError(f"{filename}:{line}: global/nonlocal statements are not allowed")
    if require_workflow:
        _require_workflow_class(tree, filename)
    return tree


def _is_bad_dunder(name: str) -> bool:
    return name.startswith("__") and name.endswith("__") and name not in ALLOWED_DUNDERS


def _require_workflow_class(tree: ast.Module, filename: str) -> None:
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == "Workflow":
            for item in node.body:
                if isinstance(item, ast.AsyncFunctionDef) and item.name == "__call__":
                    return
            raise WorkflowCheckError(f"{filename}: class Workflow has no 'async def __call__(self, problem)'")
    raise WorkflowCheckError(f"{filename}: no class Workflow is defined")
