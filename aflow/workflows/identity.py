"""When are two workflows the same? When they send the executor the same requests and compute the same way.

A policy that is paid for "new" workflows learns to make cosmetic edits unless the search can tell
them apart from real ones: a comment, a docstring, blank lines, a reflowed prompt string or a
renamed local all leave the workflow's behaviour unchanged. `behaviour_hash` is a hash of what
is left after removing them: the syntax trees of graph.py and prompt.py without docstrings, with
every string constant's whitespace collapsed (the executor reads "Solve  it.\n" as "Solve it."),
and with the names a function assigns renamed in order of appearance. Code that does not
parse hashes its raw text (it is rejected by the static checks anyway).
"""

from __future__ import annotations

import ast
import hashlib
import re

from aflow.parsing import PARSE_ERRORS


class _Normalise(ast.NodeTransformer):
    def visit_Constant(self, node: ast.Constant):
        if isinstance(node.value, str):
            return ast.copy_location(ast.Constant(" ".join(node.value.split())), node)
        return node

    def _strip_docstring(self, node):
        body = getattr(node, "body", None)
        if (body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)):
            node.body = body[1:] or [ast.Pass()]
        return node

    def visit_Module(self, node):
        return self.generic_visit(self._strip_docstring(node))

    def visit_ClassDef(self, node):
        return self.generic_visit(self._strip_docstring(node))

    def visit_FunctionDef(self, node):
        node = self.generic_visit(self._strip_docstring(node))
        return _rename_locals(node)

    visit_AsyncFunctionDef = visit_FunctionDef


def _rename_locals(function):
    """Names assigned in a function's body -> v0, v1, ... in order of appearance. Arguments keep their
    names: the sandbox may pass them by keyword, so they are part of the interface."""
    arguments = {a.arg for a in (*function.args.posonlyargs, *function.args.args, *function.args.kwonlyargs)}
    names: dict[str, str] = {}
    for node in ast.walk(function):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store) and node.id not in arguments:
            names.setdefault(node.id, f"v{len(names)}")
    for node in ast.walk(function):
        if isinstance(node, ast.Name) and node.id in names:
            node.id = names[node.id]
    return function


def _normal_form(source: str) -> str:
    try:
        tree = ast.parse(source)
    except PARSE_ERRORS:
        return "raw:" + re.sub(r"\s+", " ", source).strip()
    return ast.dump(_Normalise().visit(tree), annotate_fields=False, include_attributes=False)


def behaviour_hash(graph: str, prompt: str) -> str:
    """16 hex digits naming what a workflow does; equal for workflows that differ only cosmetically."""
    blob = _normal_form(graph) + "\n--\n" + _normal_form(prompt)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
