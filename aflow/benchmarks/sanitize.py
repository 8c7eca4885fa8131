"""AFlow's code sanitising, reproduced: what part of a model's answer is the solution.

AFlow (`scripts/utils/sanitize.py`) scores HumanEval and MBPP answers after two steps:

1. `code_extract`: of all runs of two or more consecutive lines that parse as Python, the
   one with the most non-blank lines (the first such run in reading order on a tie). This
   drops the prose and the Markdown fences around a code block. A single line is never a
   run; when no run parses, the first line of the answer is what is left.
2. keep only the top-level imports, plus the functions, classes and `NAME = ...`
   assignments reachable from the entry point (by the names their code mentions), in the
   order they were written; everything else (top-level calls, prints, tests) is dropped.

AFlow finds the run by parsing every pair of lines (cubic in the answer's length); this
finds the same run with pruning (a pair that cannot beat the best so far is not parsed)
and refuses answers of more than MAX_LINES lines, which AFlow would take minutes to read.
Both steps only parse: nothing of the answer runs here. They are still CPU work on untrusted
text (a few hundred lines of unclosed brackets take seconds; a thousand nested operators make
`ast.unparse` recurse past Python's limit), so scoring calls `sanitized` in a worker process,
bounded in time and memory, off the event loop (`code_check.check_solution`). The one cheap case
stays in the caller (`sanitize_if_cheap`): an answer of at most CHEAP_CHARS characters that parses as a
whole is its own longest run, so sanitising it is one parse and one walk.
"""

from __future__ import annotations

import ast
import warnings

from aflow.parsing import PARSE_ERRORS

MAX_LINES = 2000
CHEAP_CHARS = 20_000


class SanitizeError(ValueError):
    """The answer is too long to sanitise."""


def _parse(code: str) -> ast.Module:
    with warnings.catch_warnings():  # "invalid escape sequence" in an answer is not our warning
        warnings.simplefilter("ignore")
        return ast.parse(code)


def _parses(code: str) -> bool:
    try:
        _parse(code)
        return True
    except PARSE_ERRORS:
        return False


def code_extract(text: str) -> str:
    """The longest run of lines that parses, as AFlow's `code_extract` chooses it."""
    lines = text.split("\n")
    if len(lines) > MAX_LINES:
        raise SanitizeError(f"the answer has {len(lines)} lines (at most {MAX_LINES} are read)")
    filled = [0]
    for line in lines:
        filled.append(filled[-1] + bool(line.strip()))
    best, pair = 0, (0, 0)
    for i in range(len(lines)):
        if filled[len(lines)] - filled[i] <= best:
            break  # even every line to the end would not beat the best
        for j in range(len(lines) - 1, i, -1):
            count = filled[j + 1] - filled[i]
            if count <= best:
                break
            if _parses("\n".join(lines[i : j + 1])):
                # AFlow scans j upwards and keeps the first j reaching this count: drop the
                # blank lines that only pad the run at its end.
                while j > i + 1 and not lines[j].strip():
                    j -= 1
                best, pair = count, (i, j)
                break
    return "\n".join(lines[pair[0] : pair[1] + 1])


def _definitions(tree: ast.Module) -> tuple[list[str], list[tuple[str, ast.AST]]]:
    imports, definitions = [], []
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            imports.append(ast.unparse(node))
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            definitions.append((node.name, node))
        elif isinstance(node, ast.Assign):
            definitions += [(target.id, node) for target in node.targets if isinstance(target, ast.Name)]
    return imports, definitions


def sanitize(text: str, entry_point: str | None) -> str:
    """The solution AFlow would run for an answer: the extracted run, reduced to the imports
    and the definitions the entry point needs. An answer whose run does not parse is returned
    as extracted (then it fails to load, as in AFlow)."""
    code = code_extract(text)
    try:
        tree = _parse(code)
    except PARSE_ERRORS:
        return code
    return _reduce(tree, entry_point)


def _reduce(tree: ast.Module, entry_point: str | None) -> str:
    """Step 2: the imports and the definitions the entry point reaches, in written order."""
    imports, definitions = _definitions(tree)
    if entry_point:
        names = {name for name, _ in definitions}
        uses = {name: set() for name in names}
        for name, node in definitions:
            uses[name] |= {n.id for n in ast.walk(node) if isinstance(n, ast.Name) and n.id in names}
        reachable: set[str] = set()
        stack = [entry_point] if entry_point in names else []
        while stack:
            name = stack.pop()
            if name not in reachable:
                reachable.add(name)
                stack.extend(uses[name])
        definitions = [(name, node) for name, node in definitions if name in reachable]
    return "\n".join(imports + [ast.unparse(node) for _, node in definitions])


def sanitized(text: str, entry_point: str | None) -> list:
    """`sanitize` for a worker process: [solution, None], or [None, why] when it cannot be read."""
    try:
        return [sanitize(text, entry_point), None]
    except SanitizeError as exc:
        return [None, str(exc)]
    except (RecursionError, MemoryError):
        return [None, "the answer is nested too deeply to read"]


def sanitize_if_cheap(text: str, entry_point: str | None) -> str | None:
    """`sanitize(text)` when it costs about one parse (the whole answer, at most CHEAP_CHARS characters,
    parses: no search for a run), else None: the caller sends the answer to a worker (`sanitized`)."""
    if len(text) > CHEAP_CHARS or len(text.split("\n")) > MAX_LINES:
        return None
    try:
        tree = _parse(text)  # the whole answer parses: it is its own longest run (code_extract's choice)
    except PARSE_ERRORS:
        return None
    except (RecursionError, MemoryError):
        return None
    try:
        return _reduce(tree, entry_point)
    except (RecursionError, MemoryError):
        return None
