"""MATH scoring follows AFlow's rule, is off the event loop, time-bounded, and safe on hostile answers.

Answers are untrusted (the score is the RL reward): a crafted answer must neither stall the
trusted event loop nor run code in the scoring process, and every legitimate answer must
score as AFlow's benchmarks/math.py scores it, but for the documented defect fixes. See
aflow/benchmarks/offload.py and the MATH section of aflow/benchmarks/scoring.py."""

from __future__ import annotations

import asyncio
import gc
import os
import re
import threading
import time
import uuid

import pytest

from aflow.benchmarks import Problem, get_benchmark, offload, scoring

BENCH = get_benchmark("math")
TIMEOUT = 3.0  # the per-call bound the hostile tests use (production: MATH_SCORE_TIMEOUT_S)
# A plain-math reference, so that "\\boxed{0.5}" needs sympy (the scoring worker) to score 1.
SOLUTION = "so the answer is $\\boxed{1/2}$."
PROBLEM = Problem(id="half", inputs={"problem": "half?"}, reference={"solution": SOLUTION}, gold=SOLUTION)


def score(output: str, problem: Problem = PROBLEM) -> tuple[float, str | None]:
    return asyncio.run(BENCH.score(problem, output))


@pytest.fixture(scope="module", autouse=True)
def warm_math_pool():
    """Start the scoring worker once (interpreter, sympy, warm-up), so timings below measure
    scoring, not start-up."""
    assert score("\\boxed{0.5}") == (1.0, None)
    yield


@pytest.fixture
def short_timeout(monkeypatch):
    monkeypatch.setattr(scoring, "MATH_SCORE_TIMEOUT_S", TIMEOUT)


async def score_while_ticking(output: str, problem: Problem = PROBLEM):
    """(result, start, end, ticks): the scoring of `output` beside a task that wakes every 10 ms, each tick
    recorded as (wall clock, CPU time of the loop's thread). The collector is held off meanwhile, so that a
    collection over the objects other tests left in this process is not counted as the scoring's.
    (bench/math_scoring.py reads the same measurement for its exact times.)"""
    ticks: list[tuple[float, float]] = []
    done = asyncio.Event()

    async def ticker():
        ticks.append((time.monotonic(), time.thread_time()))
        while not done.is_set():
            await asyncio.sleep(0.01)
            ticks.append((time.monotonic(), time.thread_time()))

    collecting = gc.isenabled()
    gc.disable()
    try:
        tick = asyncio.create_task(ticker())
        await asyncio.sleep(0.03)
        started = time.monotonic()
        try:
            result = await BENCH.score(problem, output)
        finally:
            finished = time.monotonic()
            done.set()
            await tick
    finally:
        if collecting:
            gc.enable()
    return result, started, finished, ticks


async def _score_while_ticking(output: str, problem: Problem = PROBLEM) -> tuple[tuple, float, float, int]:
    """(result, seconds, the most CPU time the loop's thread spent between two ticks, ticks served while the
    scoring ran). CPU time, not wall time, between ticks: a busy machine delays the ticks (a gap of 0.63 s
    failed this test once, with another job on the 2 cores) but cannot add to what the loop computed itself."""
    result, started, finished, ticks = await score_while_ticking(output, problem)
    computed = max(after[1] - before[1] for before, after in zip(ticks, ticks[1:], strict=False))
    served = sum(started < wall <= finished for wall, _ in ticks)
    return result, finished - started, computed, served


HOSTILE_SLOW = {
    "200 KB sum": "\\boxed{" + "x+" * 100_000 + "1}",
    "50000 additions": "\\boxed{" + "1+" * 50_000 + "1}",
    "nested braces, long": "\\boxed{" + "{" * 20_000 + "1" + "}" * 20_000 + "}",
    "nested braces, under the length cap": "\\boxed{" + "{" * 2000 + "1" + "}" * 2000 + "}",
    "nested fractions": "\\boxed{" + "\\frac{1}{" * 400 + "2" + "}" * 400 + "}",
    "tower of powers": "\\boxed{9^{9^{9^{9}}}}",
    "tower, plain": "\\boxed{9^9^9^9}",
    "huge factorial": "\\boxed{(10^{10})!}",
    "many terms": "\\boxed{" + "+".join(f"x_{{{i}}}^{{{i}}}" for i in range(300)) + "}",
    "bare long line": "the answer: " + "(" * 3000 + "1" + ")" * 3000,
    # plain math, so these reach sympy in the worker
    "tower, stars": "\\boxed{9**9**9**9}",
    "huge power": "\\boxed{(x+y+z+1)^200-(x-y-z-1)^200}",
    "nested parentheses, plain": "\\boxed{" + "(" * 1000 + "1" + ")" * 1000 + "}",
    "nested functions": "\\boxed{" + "sin(" * 1000 + "1" + ")" * 1000 + "}",
    "2000 additions": "\\boxed{" + "1+" * 2000 + "1}",
}


@pytest.mark.parametrize("name", list(HOSTILE_SLOW))
def test_hostile_answer_is_bounded_and_the_loop_keeps_serving(name, short_timeout):
    """Load-proof forms of the bounds; `python -m bench.math_scoring` prints the exact times
    (seconds per answer, the longest wall-clock gap of the loop)."""
    output = HOSTILE_SLOW[name]
    for _ in range(2):  # a warm idle worker, so no worker start-up is timed below (2nd try: an idle one had died)
        if score("\\boxed{0.5}") == (1.0, None):
            break
    result, elapsed, computed, served = asyncio.run(_score_while_ticking(output))
    assert result[0] == 0.0
    # Bounded by the caller's deadline (TIMEOUT): unbounded, these answers take minutes or
    # forever; without the deadline, the worker's CPU backstop would end them (SIGXCPU).
    assert elapsed < TIMEOUT + 10.0, f"{name}: scored in {elapsed:.1f} s"
    assert "SIGXCPU" not in str(result[1]), result
    # The loop computed little itself (sympy on the loop: seconds of CPU for the slowest) ...
    assert computed < 0.5, f"{name}: the event loop computed for {computed:.2f} s between two ticks"
    # ... and, while an answer waited on the worker (3 s for the slowest), it kept serving: at
    # least 2 ticks a second of the 100 it would serve idle. A loop blocked on the worker serves none.
    if scoring._math_decided(scoring.math_answer(output), scoring.math_answer(SOLUTION)) is None:
        assert served >= int(elapsed / 0.5), f"{name}: the loop served {served} ticks in {elapsed:.1f} s"
    # The reference still scores, with or without a replaced worker.
    assert score(SOLUTION) == (1.0, None)
    assert score("\\boxed{0.5}") == (1.0, None)


def test_timeout_is_a_wrong_answer_with_a_reason():
    # 0.05 s is far less than sympy needs to simplify this difference (about 1 s).
    result = asyncio.run(scoring.math_score_bounded("\\boxed{(x+1)^30-(x-1)^30}", "\\boxed{(x+2)^30}",
                                                    timeout=0.05))
    assert result == (0.0, "scoring timed out after 0.05 s")
    assert score("\\boxed{0.5}") == (1.0, None)


CODE = [
    "__import__('os').system('touch {marker}')",
    "().__class__.__base__.__subclasses__()",
    "(lambda: __import__('os').system('touch {marker}'))()",
    "eval(\"__import__('os').system('touch {marker}')\")",
    "exec(\"import os; os.system('touch {marker}')\")",
    "open('{marker}', 'w').write('1')",
    "getattr(__import__('os'), 'system')('touch {marker}')",
    "[c for c in ().__class__.__bases__[0].__subclasses__() if c.__name__ == 'Popen'][0]('touch {marker}')",
    "Integer(1).__class__.__mro__[-1].__subclasses__()",
    "\\operatorname{__import__}('os').system('touch {marker}')",
    "3 if __import__('os').system('touch {marker}') else 3",
]


@pytest.mark.parametrize("template", CODE)
@pytest.mark.parametrize("wrapping", ["\\boxed{{{}}}", "the answer is $${}$$", "{}"])
def test_code_in_the_answer_neither_runs_nor_scores(template, wrapping, tmp_path):
    marker = tmp_path / f"pwned_{uuid.uuid4().hex}"
    answer = template.replace("{marker}", str(marker))
    assert score(wrapping.format(answer)) == (0.0, None)
    assert scoring.math_score(wrapping.format(answer), SOLUTION) == 0.0
    assert not marker.exists()
    assert score(SOLUTION) == (1.0, None)


PLAIN = ["1/2", "0.5", ".5", "2^3", "2**3", "(x+1)^2 - x*y", "sqrt(8)", "2*pi", "E", "I", "oo", "-3",
         "log(8)/log(2)", "sin(x)^2+cos(x)^2", "exp(1)", "m + 2", "N+1", "1.", "1 / (2 - x)"]
NOT_PLAIN = ["", "   ", "\\frac{1}{2}", "x_1", "x1", "1e5", "0x1F", "1_000", "(1, 2)", "[1]", "{1}", "'1'", "x.y",
             "1 .real", "1.real", "abs(1)", "lambda: 1", "1 if x else 2", "x == 1", "x < 1", "x; y", "a@b", "2%3",
             "~x", "x!", "sympify(1)", "Symbol", "N(1, 2)", "S.One", "__import__", "eval", "\uff45", "\u0663",
             "1" * (scoring.MAX_MATH_ANSWER_CHARS + 1)]


@pytest.mark.parametrize("text", PLAIN)
def test_plain_math_is_parsed(text):
    assert scoring.plain_math(text)
    assert scoring._sympy_value(text) is not None


@pytest.mark.parametrize("text", NOT_PLAIN)
def test_anything_else_is_not_parsed(text):
    assert not scoring.plain_math(text)
    assert scoring._sympy_value(text) is None


def test_sympy_eval_of_answer_text_is_refused(tmp_path):
    """The guard on sympy's eval holds even if text that is not plain math ever reached
    sympify while an answer is parsed (a regression here or in sympy)."""
    import sympy

    marker = tmp_path / "pwned"
    scoring._guard_sympy_eval()
    with scoring._untrusted_text():
        assert sympy.sympify("2/4") == sympy.Rational(1, 2)
        assert sympy.Number("1.5") == sympy.Float("1.5")
        assert sympy.sympify("sqrt(8)") == 2 * sympy.sqrt(2)
        for text in (f"__import__('os').system('touch {marker}')", "(lambda: 1)()", "Integer(1).__class__",
                     "x.__class__", "(y := 2)", "Function('f')(1)", "N(1)", "S(1)", "pi.evalf()"):
            with pytest.raises((ValueError, sympy.SympifyError)):
                sympy.sympify(text)
    assert not marker.exists()
    assert sympy.sympify("S(2) + N(1)") == sympy.Float(3)  # outside an answer's parse sympy is unchanged
    assert not scoring._arithmetic_only("__import__('os')")
    assert scoring._arithmetic_only("Add(Integer(1), Pow(Float('2.5'), Integer(-1), evaluate=False))")
    x = sympy.Symbol("x")
    assert scoring._arithmetic_only("x + sqrt(Integer(2))", {"x": x})
    assert not scoring._arithmetic_only("x + Integer(2)", {"x": sympy.Function("x")})
    assert not scoring._arithmetic_only("x.x", {"x": x})  # attribute access, even of an allowed name


def test_worker_is_confined(tmp_path, monkeypatch):
    """Even code running in a worker finds no secrets, cannot write, spawn or eval strings."""
    monkeypatch.setenv("OPENAI_API_KEY", "sk-secret-for-the-test")
    pool = offload.WorkerPool(name="test-confined", size=1)
    marker = tmp_path / "pwned"
    try:
        run = pool.run_blocking
        assert run(os.getenv, "OPENAI_API_KEY", timeout=30) is None
        assert run(os.getenv, "PATH", timeout=30)
        for fn, args in ((os.system, (f"touch {marker}",)), (eval, ("1+1",)), (exec, ("x = 1",)),
                         (open, (str(marker), "w")), (open, ("/etc/hostname",)), (os.listdir, ("/",))):
            with pytest.raises(offload.RemoteError):
                run(fn, *args, timeout=30)
        assert not marker.exists()
        assert run(abs, -3, timeout=30) == 3
    finally:
        pool.close()


@pytest.mark.parametrize("variant", ["aflow", "reward"])
def test_all_reference_solutions_score_through_the_benchmark(data_dir, variant):
    """Every reference scores 1, decided by the cheap checks in the loop (no worker started).
    The cost per answer (target: under 5 ms) is timed by `python -m bench.math_scoring`, not
    here, where a busy machine would decide it."""
    problems = BENCH.load("validate", data_dir) + BENCH.load("test", data_dir)
    assert len(problems) == 605
    started_workers = scoring.MATH_POOL.started
    # the reference solution, and its answer alone in a sentence
    cases = [(p, output) for p in problems
             for output in (p.gold, f"The answer is $\\boxed{{{scoring.last_boxed(p.gold)}}}$.")]

    async def all_gold():
        return [await BENCH.score(p, output, scoring=variant) for p, output in cases]

    results = asyncio.run(all_gold())
    assert [r for r in results if r != (1.0, None)] == []
    assert scoring.MATH_POOL.started == started_workers  # the string comparison decided them all


def test_aflow_cannot_read_nine_references(data_dir):
    """AFlow's regex reads \\boxed{} nested one level deep: 9 of the 605 references nest deeper,
    and AFlow compares their last sentences instead. This project reads the boxed answer."""
    aflow_boxed = re.compile(r"\\boxed{((?:[^{}]|{[^{}]*})*)}", re.DOTALL)
    problems = BENCH.load("validate", data_dir) + BENCH.load("test", data_dir)
    unread = [p for p in problems if (aflow_boxed.findall(p.gold) or [None])[-1] != scoring.last_boxed(p.gold)]
    assert len(unread) == 9
    assert "\\frac{6\\sqrt{10}}{7}" in [scoring.math_answer(p.gold) for p in unread]
    for p in unread:
        assert score(f"\\boxed{{{scoring.math_answer(p.gold)}}}", p) == (1.0, None)


# (output, reference solution, score): AFlow's rule (equal strings, numbers within 1e-3, or
# plain expressions sympy finds equal; no LaTeX parsing), and the defect fixes.
EQUIVALENT = [
    ("thus \\boxed{\\frac{1}{2}}", "... \\boxed{\\frac{1}{2}}", 1.0),
    ("\\boxed{ \\frac{1}{2} }", "\\boxed{\\frac{1}{2}}", 1.0),  # stripped
    ("\\boxed{\\text{(C)}}", "\\boxed{\\text{(C)}}", 1.0),
    ("\\boxed{0.5}", "\\boxed{1/2}", 1.0),  # plain expressions: sympy
    ("\\boxed{2*sqrt(2)}", "\\boxed{sqrt(8)}", 1.0),
    ("\\boxed{(x+1)^2}", "\\boxed{x^2+2*x+1}", 1.0),
    ("\\boxed{2+m}", "\\boxed{m+2}", 1.0),
    ("\\boxed{3.1416}", "\\boxed{pi}", 1.0),  # N(a), N(b) within 1e-3
    ("\\boxed{oo}", "\\boxed{oo}", 1.0),
    ("\\boxed{1,000}", "\\boxed{1000}", 1.0),  # numbers: commas dropped, % read as /100, 1e-3
    ("\\boxed{50\\%}", "\\boxed{0.5}", 1.0),
    ("\\boxed{0.5004}", "\\boxed{0.5}", 1.0),
    ("\\boxed{12.0}", "\\boxed{12}", 1.0),
    ("7", "\\boxed{7}", 1.0),  # nothing boxed: the last sentence
    ("Adding them up gives the total.\n7", "\\boxed{7}", 1.0),
    ("We find x = 3. So 7", "\\boxed{7}", 0.0),  # no sentence ends after a digit: the whole text
    ("\\boxed{7}. Check: 3 + 4 = 7.", "\\boxed{7}", 1.0),
    ("\\boxed{1} at first, then \\boxed{7}", "\\boxed{7}", 1.0),
    ("\\boxed{\\dfrac{1}{2}}", "\\boxed{\\frac{1}{2}}", 0.0),  # LaTeX is not parsed (AFlow has no antlr4)
    ("the value is \\boxed{0.5}", "\\boxed{\\frac12}", 0.0),
    ("\\boxed{1/2}", "\\boxed{\\frac{1}{2}}", 0.0),
    ("\\boxed{2\\sqrt{2}}", "\\boxed{\\sqrt{8}}", 0.0),
    ("\\boxed{x^2+2x+1}", "\\boxed{(x+1)^2}", 0.0),  # no implicit multiplication
    ("\\boxed{x = 3}", "\\boxed{3}", 0.0),
    ("\\boxed{(1, 2)}", "\\boxed{(1,2)}", 0.0),
    ("\\boxed{90^\\circ}", "\\boxed{90}", 0.0),
    ("\\boxed{50\\%}", "\\boxed{\\frac{1}{2}}", 0.0),
    ("\\boxed{3}", "\\boxed{4}", 0.0),
    ("\\boxed{0.51}", "\\boxed{1/2}", 0.0),
    ("The answer is 7", "\\boxed{7}", 0.0),  # the last sentence is the whole text
    ("The answer is $7$.", "\\boxed{7}", 0.0),
    ("nothing boxed, answer 7", "\\boxed{8}", 0.0),
    # defects fixed (AFlow's score in the comment)
    ("\\boxed{\\frac{6\\sqrt{10}}{7}}", "So $\\boxed{\\frac{6\\sqrt{10}}{7}}$.", 1.0),  # 0: nesting
    ("\\fbox{12}", "\\boxed{12}", 1.0),  # 0: \\fbox
    ("\\boxed{2^3}", "\\boxed{8}", 1.0),  # 0: ^ is XOR
    ("\\boxed{2^3}", "\\boxed{1}", 0.0),  # 1: ^ is XOR
    ("\\boxed{N+1}", "\\boxed{1+N}", 1.0),  # 0: N is sympy's N()
    ("\\boxed{x_1+x_2}", "\\boxed{x_2+x_1}", 0.0),  # 1: not plain math, never parsed
    ("\\boxed{}", "\\boxed{}", 0.0),  # 1: an empty reference matches nothing
]
# Pairs that need sympy, so the scoring worker.
IN_WORKER = [(o, s, e) for o, s, e in EQUIVALENT
             if scoring._math_decided(scoring.math_answer(o), scoring.math_answer(s)) is None]


def test_cheap_checks_decide_all_but_plain_math():
    assert len(IN_WORKER) == 10
    assert all(scoring.plain_math(scoring.math_answer(o)) for o, _, _ in IN_WORKER)


@pytest.mark.parametrize("output,solution,expected", EQUIVALENT)
def test_equivalent_forms_score_as_aflow(output, solution, expected):
    problem = Problem(id="e", inputs={"problem": ""}, reference={"solution": solution}, gold=solution)
    assert score(output, problem) == (expected, None)
    assert asyncio.run(BENCH.score(problem, output, scoring="reward")) == (expected, None)
    assert scoring.math_score(output, solution) == expected


def test_equivalent_forms_score_off_the_main_thread():
    """A Ray async actor runs its event loop in a thread of its own (where a SIGALRM time
    bound cannot work): scores there are the same."""
    results = []
    thread = threading.Thread(target=lambda: results.extend(score(o, Problem(
        id="e", inputs={"problem": ""}, reference={"solution": s}, gold=s))[0] for o, s, _ in EQUIVALENT))
    thread.start()
    thread.join()
    assert results == [expected for _, _, expected in EQUIVALENT]


def test_many_concurrent_scorings_match_sequential_ones(short_timeout):
    cases = []
    for i in range(50):
        kind = i % 5
        if kind == 0:
            cases.append(("\\boxed{0.5}", SOLUTION))
        elif kind == 1:
            cases.append((f"\\boxed{{{i}}}", f"\\boxed{{{i + 1}}}"))
        elif kind == 2:
            cases.append((f"\\boxed{{{i}/2}}", f"\\boxed{{{i / 2}}}"))
        elif kind == 3:
            cases.append((f"\\boxed{{(x+{i})^2}}", f"\\boxed{{x^2+{2 * i}*x+{i * i}}}"))
        else:
            cases.append(("\\boxed{__import__('os').getcwd()}", SOLUTION))
    problems = [Problem(id=str(i), inputs={"problem": ""}, reference={"solution": s}, gold=s)
                for i, (_, s) in enumerate(cases)]

    async def concurrent():
        return await asyncio.gather(*(BENCH.score(p, o) for p, (o, _) in zip(problems, cases, strict=True)))

    async def sequential():
        return [await BENCH.score(p, o) for p, (o, _) in zip(problems, cases, strict=True)]

    together = asyncio.run(concurrent())
    one_by_one = asyncio.run(sequential())
    assert together == one_by_one
    assert [s for s, _ in together] == [scoring.math_score(o, s) for o, s in cases]
    assert [s for s, _ in together] == [1.0, 0.0, 1.0, 1.0, 0.0] * 10


def test_pool_survives_timeouts_and_dead_workers():
    pool = offload.WorkerPool(name="test-survive", size=1)
    try:
        assert asyncio.run(offload.run_bounded(abs, -1, pool=pool, timeout=30)) == 1
        began = time.monotonic()
        with pytest.raises(offload.Timeout, match="timed out after 0.5 s"):
            asyncio.run(offload.run_bounded(time.sleep, 60, pool=pool, timeout=0.5))
        assert time.monotonic() - began < 30  # the deadline ended the call, not the 60 s sleep
        assert asyncio.run(offload.run_bounded(abs, -2, pool=pool, timeout=30)) == 2
        with pytest.raises(offload.WorkerDied):
            asyncio.run(offload.run_bounded(os._exit, 3, pool=pool, timeout=30))
        assert asyncio.run(offload.run_bounded(abs, -3, pool=pool, timeout=30)) == 3
        with pytest.raises(offload.RemoteError, match="ZeroDivisionError"):
            asyncio.run(offload.run_bounded(divmod, 1, 0, pool=pool, timeout=30))
        assert asyncio.run(offload.run_bounded(abs, -4, pool=pool, timeout=30)) == 4
    finally:
        pool.close()


def _running(pid: int) -> bool:
    """The process exists and has not exited (a zombie has)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def test_math_pool_survives_a_killed_worker():
    assert score("\\boxed{0.5}") == (1.0, None)
    deadline = time.monotonic() + 60
    while not scoring.MATH_POOL.pids() and time.monotonic() < deadline:
        time.sleep(0.05)
    pids = scoring.MATH_POOL.pids()
    for pid in pids:
        os.kill(pid, 9)
    while any(_running(pid) for pid in pids) and time.monotonic() < deadline:  # dead, not just signalled
        time.sleep(0.05)
    assert score("\\boxed{0.5}") == (1.0, None)  # a dead idle worker is replaced, not reported
    assert score("\\boxed{0.25}") == (0.0, None)


def test_functions_a_worker_cannot_import_are_refused_in_the_caller():
    with pytest.raises(TypeError):
        asyncio.run(offload.run_bounded(lambda: 1))


def test_scoring_inside_a_ray_async_actor(_ray_session):
    """The RL environment workers are async Ray actors: their loop runs off the main thread,
    and the pool must serve it (and die with it)."""
    ray = _ray_session

    @ray.remote(num_cpus=0)
    class Scorer:
        async def score(self, cases):
            from aflow.benchmarks import Problem, get_benchmark
            from aflow.benchmarks import scoring as actor_scoring

            bench = get_benchmark("math")
            results = [await bench.score(Problem(id="r", inputs={"problem": ""}, reference={"solution": s}, gold=s), o)
                       for o, s in cases]
            return results, threading.current_thread() is threading.main_thread(), actor_scoring.MATH_POOL.pids()

    cases = [(o, s) for o, s, e in IN_WORKER if e == 1.0][:6] + [("\\boxed{3}", "\\boxed{4}")]
    actor = Scorer.remote()
    results, on_main_thread, pids = ray.get(actor.score.remote(cases), timeout=300)
    assert not on_main_thread
    assert [r[0] for r in results] == [1.0] * 6 + [0.0]
    ray.kill(actor)
    deadline = time.monotonic() + 30
    while any(os.path.exists(f"/proc/{pid}") for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(os.path.exists(f"/proc/{pid}") for pid in pids)  # workers exit with their actor
