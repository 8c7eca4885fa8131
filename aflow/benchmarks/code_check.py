"""Checking a code answer against a benchmark's tests, with a verdict the answer cannot forge.

The answer and the tests never share a process. The *candidate* sandbox loads the solution
as a module of its own (compiled alone, after a trusted preamble of the prompt's imports and
helper functions) and answers calls. The *checker* sandbox runs the benchmark's test source,
with the entry point (and any other name only the solution defines) bound to proxies; every
call is relayed by this process, and what the candidate returns crosses as tagged JSON of
builtin types that the checker decodes itself. So in the checker there is no object of the
candidate's: no `__eq__` of its, no patched module or builtin, no trace hook, no frame to
read the expected values from; and the test source never exists in the candidate's process.

A problem passes only on a positive record: the checker reports, with a per-run secret that
only it and this process know, the set of numbered `assert` statements that ran, and that
set must be every assert of the tests. An early exit, a crash, a timeout, or a missing,
incomplete or unauthenticated report is a fail. See README "The code checker's threat model".
"""

from __future__ import annotations

import ast
import asyncio
import builtins
import hmac
import secrets
import sys
from dataclasses import dataclass

from aflow.benchmarks import offload
from aflow.benchmarks.sanitize import sanitize_if_cheap, sanitized
from aflow.sandbox import CODE_LIMITS, Limits, Sandbox, SandboxResult, SessionError

RAN_HOOK = "__aflow_ran__"
# The names AFlow's checker puts in the solution's globals before running it.
AFLOW_PRELOADED = "import math\nimport hashlib\nimport re\nfrom typing import List, Dict, Tuple, Optional, Any\n"


@dataclass(frozen=True)
class CodeTask:
    """Everything the two sandboxes get for one problem (none of it is the reference solution)."""

    entry_point: str
    test: str  # the test source, each assert followed by `RAN_HOOK(n)` on the same line
    asserts: int
    solution_preamble: str  # run in the candidate's module before the solution
    test_preamble: str  # run in the checker before the tests
    modules: tuple[str, ...] = ()  # standard modules the tests use without importing them
    remote_names: tuple[str, ...] = ()  # names the tests take from the solution
    pass_candidate: bool = False  # HumanEval's `check(candidate)` vs MBPP's `check()`


def number_asserts(source: str) -> tuple[str, int]:
    """The source with `; __aflow_ran__(n)` after the n-th assert, lines kept where they were
    (so a failure's line number is the test file's), and the count of asserts."""
    tree = ast.parse(source)
    asserts = sorted((n for n in ast.walk(tree) if isinstance(n, ast.Assert)),
                     key=lambda n: (n.end_lineno, n.end_col_offset))
    lines = source.splitlines(keepends=True)
    for number, node in reversed(list(enumerate(asserts))):
        row = lines[node.end_lineno - 1].encode()  # ast offsets count UTF-8 bytes
        cut = node.end_col_offset
        lines[node.end_lineno - 1] = (row[:cut] + f"; {RAN_HOOK}({number})".encode() + row[cut:]).decode()
    return "".join(lines), len(asserts)


def _bound_names(tree: ast.AST) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(alias.asname or alias.name).split(".")[0] for alias in node.names}
        elif isinstance(node, ast.Name) and not isinstance(node.ctx, ast.Load):
            names.add(node.id)
        elif isinstance(node, ast.ExceptHandler) and node.name:
            names.add(node.name)
    return names


def _free_names(test: str, preamble: str) -> set[str]:
    tree = ast.parse(test)
    loaded = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
    return loaded - _bound_names(tree) - _bound_names(ast.parse(preamble)) - set(dir(builtins))


def _prompt_preamble(prompt: str, entry_point: str) -> str:
    """A HumanEval prompt's imports and helper definitions (poly, encode_cyclic, ...), without
    the entry point: trusted code, given to both sides, so a solution that redefines a helper
    changes only its own module, never what the tests use."""
    try:
        tree = ast.parse(prompt)
    except SyntaxError:
        return ""
    keep = []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name == entry_point:
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef,
                             ast.Assign)):
            keep.append(ast.get_source_segment(prompt, node) or "")
    return "\n".join(part for part in keep if part) + "\n"


def make_task(test: str, entry_point: str, preamble: str, pass_candidate: bool) -> CodeTask:
    numbered, count = number_asserts(test)
    free = _free_names(test, preamble)
    modules = tuple(sorted(n for n in free if n in sys.stdlib_module_names and n != entry_point))
    # The entry point always comes from the solution, even when it shadows a builtin (MBPP 126: `sum`).
    remote = tuple(sorted((free - set(modules)) | {entry_point}))
    return CodeTask(entry_point=entry_point, test=numbered, asserts=count, solution_preamble=preamble,
                    test_preamble=preamble, modules=modules, remote_names=remote, pass_candidate=pass_candidate)


def humaneval_task(reference: dict) -> CodeTask:
    preamble = AFLOW_PRELOADED + _prompt_preamble(reference["prompt"], reference["entry_point"])
    return make_task(reference["test"], reference["entry_point"], preamble, pass_candidate=True)


def mbpp_task(reference: dict) -> CodeTask:
    preamble = AFLOW_PRELOADED + "".join(f"{line}\n" for line in reference.get("imports", []))
    return make_task(reference["test"], reference["entry_point"], preamble, pass_candidate=False)


SANITIZE_TIMEOUT_S = 10.0
# Sanitising runs here, not in the event loop: one slow answer must not hold up the problems in flight.
SANITIZE_POOL = offload.WorkerPool(name="sanitize", preload=("aflow.benchmarks.sanitize",), memory_mb=1024,
                                   warmup=(sanitized, ("def f():\n    return 1\n", "f")))


async def check_solution(task: CodeTask, answer: str, sandbox: Sandbox,
                         limits: Limits = CODE_LIMITS) -> tuple[float, str | None]:
    """(1.0, None) when the answer's solution (sanitised as AFlow does) passes every test, else (0.0,
    why). Each step is bounded: sanitising, unless it is one parse, runs in a worker process for at most
    SANITIZE_TIMEOUT_S; the check by the limits' wall clock."""
    solution = sanitize_if_cheap(str(answer), task.entry_point)
    if solution is None:
        try:
            solution, reason = await offload.run_bounded(sanitized, str(answer), task.entry_point,
                                                         timeout=SANITIZE_TIMEOUT_S, pool=SANITIZE_POOL)
        except offload.Timeout:
            return 0.0, f"the answer took more than {SANITIZE_TIMEOUT_S:g}s to sanitise"
        except offload.OffloadError as exc:
            return 0.0, f"the answer could not be sanitised: {exc}"
        if solution is None:
            return 0.0, reason
    try:
        return await asyncio.wait_for(_check(task, solution, sandbox, limits), timeout=limits.wall_seconds)
    except asyncio.TimeoutError:
        return 0.0, f"timed out after {limits.wall_seconds:g}s (wall clock)"


async def _check(task: CodeTask, solution: str, sandbox: Sandbox, limits: Limits) -> tuple[float, str | None]:
    secret = secrets.token_hex(16)
    try:
        async with sandbox.session({"mode": "candidate", "preamble": task.solution_preamble,
                                    "solution": solution}, limits) as candidate:
            async def relay(op: str, kwargs: dict) -> dict:
                if op != "invoke":
                    raise RuntimeError(f"unknown request '{op}'")
                return await candidate.request({"type": "invoke", "target": kwargs.get("target"),
                                                "args": kwargs.get("args"), "kwargs": kwargs.get("kwargs")})

            job = {"mode": "check", "secret": secret, "test": task.test, "preamble": task.test_preamble,
                   "entry_point": task.entry_point, "modules": list(task.modules),
                   "remote_names": list(task.remote_names), "pass_candidate": task.pass_candidate}
            # The checker starts while the candidate loads; its first call waits for `ready`.
            checker = asyncio.create_task(sandbox.run_job(job, limits, relay))
            try:
                await candidate.ready()
            except SessionError:
                checker.cancel()
                await asyncio.gather(checker, return_exceptions=True)
                raise
            result = await checker
    except SessionError as exc:
        return 0.0, f"the solution does not load: {exc}"
    return verdict(result, secret, task.asserts)


def verdict(result: SandboxResult, secret: str, asserts: int) -> tuple[float, str | None]:
    """Pass only on the checker's authenticated report that every assert ran."""
    if not result.ok:
        return 0.0, f"failed a test: {result.error}"
    report = result.value
    if not isinstance(report, dict) or not hmac.compare_digest(str(report.get("secret", "")), secret):
        return 0.0, "the checker's report is not authenticated"
    ran = report.get("ran")
    if asserts == 0:
        return 0.0, "the tests assert nothing"
    if not isinstance(ran, list) or sorted(set(ran)) != list(range(asserts)):
        count = len(set(ran)) if isinstance(ran, list) else 0
        return 0.0, f"only {count} of the tests' {asserts} asserts ran"
    return 1.0, None
