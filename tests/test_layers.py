"""The tree's layers point one way, `aflow` <- `agent_system` <- `recipes`, with no import cycle
inside a layer: read from the source (every import, also those inside functions), not from what
happens to be imported at run time."""

from __future__ import annotations

import ast
import gc
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("aflow", "agent_system", "recipes", "data_prep")
# what each top-level package may import from the project (its own modules always)
ALLOWED = {
    "aflow": set(),
    "agent_system": {"aflow"},
    "data_prep": {"aflow", "agent_system"},
    "recipes": {"aflow", "agent_system", "data_prep"},
}
NEVER_IN_AFLOW = ("verl", "ray", "torch", "transformers")


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            if "builtin" in path.parts:  # workflow sources run in the sandbox, not imported
                continue
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def parse(path: Path) -> ast.Module:
    """ast.parse with the garbage collector held off. On CPython 3.11.7 a collection inside
    ast.parse that finalises an object whose __del__ raises prints the error through
    traceback, which calls ast.parse again; the nested call resets the converter's shared
    depth counter and the outer one fails with "AST constructor recursion depth mismatch"
    (CPython gh-106905). CI met it once, after an earlier test left an asyncio transport
    for the collector; a collection between two parses is harmless."""
    gc.disable()
    try:
        return ast.parse(path.read_text(encoding="utf-8"))
    finally:
        gc.enable()


def imports_of(path: Path, name: str) -> set[str]:
    tree = parse(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            out.add(module)
            out |= {f"{module}.{alias.name}" for alias in node.names}
    return out


def project_graph() -> dict[str, set[str]]:
    known = modules()
    graph = defaultdict(set)
    for name, path in known.items():
        for imported in imports_of(path, name):
            if imported in known and imported != name:
                graph[name].add(imported)
    return graph


def test_layers_point_one_way():
    wrong = []
    for name, path in modules().items():
        top = name.split(".")[0]
        for imported in imports_of(path, name):
            other = imported.split(".")[0]
            if other in PACKAGES and other != top and other not in ALLOWED[top]:
                wrong.append(f"{name} imports {imported}")
            if top == "aflow" and other in NEVER_IN_AFLOW:
                wrong.append(f"{name} imports {imported} (aflow stands alone)")
    assert not wrong, "\n".join(sorted(wrong))


def test_no_import_cycles():
    graph = project_graph()
    cycles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    # a package's __init__ importing its own submodules is not a cycle worth reporting
    cycles = [c for c in cycles if not all(part.startswith(c.split(" -> ")[0]) for part in c.split(" -> "))]
    assert not cycles, "\n".join(cycles)
