"""The workflow canvas (aflow/canvas): the action grammar and its DFA, parse/apply, the
compiler, the canonical form, and compiled canvases run in the real sandbox against a real
local OpenAI-compatible server (tests/fake_openai.py), scored by `run_problem`."""

from __future__ import annotations

import ast
import asyncio
import dataclasses
import random
import string
import sys

import pytest

from aflow.canvas import (
    KINDS,
    MAX_PROMPT_CHARS,
    MAX_STEPS,
    PROMPT_CHARS,
    Action,
    Canvas,
    CanvasError,
    Grammar,
    Step,
    anchor,
    apply,
    canonical,
    canvas_of,
    compile,
    describe_actions,
    from_canonical,
    initial,
    kinds_for,
    parse,
    render,
    replay,
)
from aflow.canvas.grammar import keyword_lines
from aflow.workflows import from_source
from tests.samples import operator_reply

GRAMMAR = Grammar()
needs_linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the sandbox is Linux-only")


def random_accepted(rng: random.Random, grammar: Grammar = GRAMMAR, stop: float = 0.5, close: float = 0.1) -> str:
    """A random line the DFA accepts: a walk that stops at an accepting state with probability
    `stop` and, inside a prompt, closes the quote with probability `close` (prompts stay short)."""
    state, out = grammar.start(), []
    while True:
        allowed = grammar.allowed(state)
        if grammar.accepting(state) and (not allowed or rng.random() < stop):
            return "".join(out)
        if grammar.text_room(state) is not None and '"' in allowed and rng.random() < close:
            char = '"'
        else:
            char = rng.choice(sorted(allowed))
        out.append(char)
        state = allowed[char]


def mutate(rng: random.Random, line: str) -> str:
    """A near miss: one character inserted, deleted or replaced (hostile characters included)."""
    pool = string.printable + '"\\\n\r\t{}é' + "ADELNRS_0123456789 "
    i = rng.randrange(len(line) + 1)
    op = rng.choice(("insert", "delete", "replace"))
    if op == "insert" or not line:
        return line[:i] + rng.choice(pool) + line[i:]
    i = min(i, len(line) - 1)
    return line[:i] + ("" if op == "delete" else rng.choice(pool)) + line[i + 1:]


def family_benchmark(canvas: Canvas) -> str:
    return "humaneval" if canvas.code else "gsm8k"


def compiled_and_checked(canvas: Canvas) -> tuple[str, str]:
    """Compile and load the way load_workflow does (from_source: the static checks)."""
    graph, prompt = compile(canvas, family_benchmark(canvas))
    code = from_source(graph, prompt, name="canvas")
    assert code.format == "native"
    return graph, prompt


# --------------------------------------------------------------------------- grammar and parse


def test_every_line_the_dfa_admits_parses_and_round_trips():
    rng = random.Random(14)
    verbs, kinds = set(), set()
    for _ in range(4000):
        line = random_accepted(rng)
        action = parse(line)
        assert isinstance(action, Action), (line, action)
        assert str(action) + ("\n" if line.endswith("\n") else "") == line
        verbs.add(action.verb)
        kinds.add(action.kind)
    assert verbs == {"ADD", "DELETE", "SET_PROMPT", "ENSEMBLE", "ROUNDS", "FINISH"}
    assert set(KINDS) <= kinds


VALID = [
    "ADD CUSTOM", "ADD TEST AFTER 0", f"ADD FORMAT AFTER {MAX_STEPS}", "DELETE 1", "ENSEMBLE 6 5", "ROUNDS 3 1",
    "FINISH", "FINISH\n", 'SET_PROMPT 1 ""', 'SET_PROMPT 2 "x"\n', 'SET_PROMPT 1 "' + "a" * MAX_PROMPT_CHARS + '"',
    "SET_PROMPT 4 \"Use ''' and __import__('os') freely: it is text.\"",
]
INVALID = [
    "", "\n", "ADD", "ADD ", "ADD  CUSTOM", "add CUSTOM", "ADD CUSTOM ", " ADD CUSTOM", "ADD FOO", "ADD CUSTOM AFTER",
    f"ADD CUSTOM AFTER {MAX_STEPS + 1}", "ADD CUSTOM AFTER 10", "DELETE 0", f"DELETE {MAX_STEPS + 1}", "DELETE 10",
    "ENSEMBLE 1", "ENSEMBLE 1 0", "ENSEMBLE 1 6", "ENSEMBLE 1 10", "ROUNDS 1 0", "ROUNDS 1 4", "FINISH ", "FINISH\n\n",
    "FINISH\r\n", "FINISH\nFINISH", "FINISHED", "SET_PROMPT 1", 'SET_PROMPT 1 "', 'SET_PROMPT 1 "a"b"',
    'SET_PROMPT 1 "a\\b"', 'SET_PROMPT 1 "a\nb"', 'SET_PROMPT 1 """"', 'SET_PROMPT 1 "{x}"', 'SET_PROMPT 0 "x"',
    'SET_PROMPT 1 "' + "a" * (MAX_PROMPT_CHARS + 1) + '"', 'SET_PROMPT 1 "x" ', "SET_PROMPT 1 'x'", "DELETE 1\n\n",
    "ENSEMBLE 1 3 4", "ROUNDS 12 1", 'SET_PROMPT 1 "caf\u00e9"',
]


@pytest.mark.parametrize("line", VALID)
def test_valid_lines_are_accepted_by_both(line):
    assert GRAMMAR.accepts(line)
    assert isinstance(parse(line), Action)


@pytest.mark.parametrize("line", INVALID)
def test_invalid_lines_are_rejected_by_both_with_a_reason(line):
    assert not GRAMMAR.accepts(line)
    reason = parse(line)
    assert isinstance(reason, str) and reason


def test_dfa_accepts_exactly_what_parse_accepts():
    rng = random.Random(1402)
    corpus = keyword_lines() + VALID + INVALID + [random_accepted(rng) for _ in range(500)]
    corpus += [mutate(rng, rng.choice(corpus)) for _ in range(6000)]
    corpus += ["".join(rng.choice(string.printable) for _ in range(rng.randrange(12))) for _ in range(500)]
    accepted = 0
    for line in corpus:
        by_dfa, by_parse = GRAMMAR.accepts(line), isinstance(parse(line), Action)
        assert by_dfa == by_parse, (line, parse(line))
        accepted += by_dfa
    assert 500 < accepted < len(corpus) - 2000  # both sides of the boundary were exercised


def test_parse_never_raises_on_anything():
    for value in (None, 3, b"FINISH", ["FINISH"], "x" * 100_000, "\x00", "SET_PROMPT 1 \"\udcff\""):
        assert isinstance(parse(value), str)


def test_dfa_is_finite_small_and_trim():
    states = list(GRAMMAR.states)
    assert 50 < len(states) < 400
    assert states == list(range(len(states)))  # ints: hashable, dense, cheap cache keys
    reach, frontier = {GRAMMAR.start()}, [GRAMMAR.start()]
    while frontier:  # every state is reachable ...
        for nxt in GRAMMAR.allowed(frontier.pop()).values():
            if nxt not in reach:
                reach.add(nxt)
                frontier.append(nxt)
    assert reach == set(states)
    live = {s for s in states if GRAMMAR.accepting(s)}
    changed = True
    while changed:  # ... and can still end in an accepted line (no dead end for a decoder)
        grown = live | {s for s in states if set(GRAMMAR.allowed(s).values()) & live}
        changed, live = grown != live, grown
    assert live == set(states)
    assert GRAMMAR.alphabet == PROMPT_CHARS | set('"\n') | set("".join(keyword_lines())) | set("SET_PROMPT ")
    assert GRAMMAR.step(GRAMMAR.start(), "\\") is None


def test_text_states_know_their_room():
    inside = GRAMMAR.walk('SET_PROMPT 3 "')
    assert GRAMMAR.text_room(inside) == MAX_PROMPT_CHARS
    assert GRAMMAR.text_room(GRAMMAR.walk('SET_PROMPT 3 "ab')) == MAX_PROMPT_CHARS - 2
    full = GRAMMAR.walk('SET_PROMPT 3 "' + "z" * MAX_PROMPT_CHARS)
    assert GRAMMAR.text_room(full) == 0 and set(GRAMMAR.allowed(full)) == {'"'}
    assert GRAMMAR.text_room(GRAMMAR.walk("ADD ")) is None
    assert all(GRAMMAR.step(inside, c) is not None for c in PROMPT_CHARS)


def test_family_grammar_admits_only_its_kinds():
    code = Grammar(kinds_for(True))
    assert code.accepts("ADD TEST") and code.accepts("ADD CODE AFTER 1")
    assert not code.accepts("ADD PROGRAM") and not code.accepts("ADD FORMAT")
    assert len(code.states) < len(GRAMMAR.states)


def test_described_actions_name_exactly_the_family_kinds():
    for code in (False, True):
        text = describe_actions(code)
        listed = {line.split(":")[0].strip() for line in text.splitlines() if line.startswith("  ") and ":" in line
                  and line.strip().split(":")[0].isupper() and " " not in line.strip().split(":")[0]}
        assert listed == set(kinds_for(code))
        assert "FINISH" in text and "SET_PROMPT" in text


# --------------------------------------------------------------------------- apply


def test_apply_reasons_leave_the_canvas_unchanged():
    start = initial(False)
    for line, words in [("DELETE 1", "only step"), ("DELETE 2", "no step 2"), ("ADD REVIEW AFTER 0", "first step"),
                        ("ADD CUSTOM AFTER 2", "only 1 step"), ("ADD TEST", "not available"),
                        ("ROUNDS 1 2", "only REVIEW and TEST"), ("ENSEMBLE 1 1", "unchanged"),
                        ('SET_PROMPT 1 "Solve the problem step by step."', "unchanged")]:
        result = apply(start, parse(line))
        assert isinstance(result, str) and words in result, (line, result)
    assert start == initial(False)
    with pytest.raises(dataclasses.FrozenInstanceError):
        start.steps = ()
    full = replay(start, ["ADD CUSTOM"] * (MAX_STEPS - 1))
    assert isinstance(full, Canvas) and len(full.steps) == MAX_STEPS
    assert "maximum" in apply(full, parse("ADD FORMAT"))
    reviewed = replay(start, ["ADD REVIEW"])
    assert "takes no prompt" in apply(reviewed, parse('SET_PROMPT 2 "x"'))
    assert "first step" in apply(reviewed, parse("DELETE 1"))
    assert apply(start, parse("FINISH")) is start


def test_invalid_canvases_and_actions_cannot_be_built():
    for bad in (lambda: Canvas(False, ()), lambda: Canvas(False, (Step("REVIEW", rounds=1),)),
                lambda: Canvas(True, (Step("PROGRAM"),)), lambda: Step("ANSWER", samples=6),
                lambda: Step("FORMAT", samples=2), lambda: Step("TEST"), lambda: Step("CUSTOM", prompt='a"b')):
        with pytest.raises(CanvasError):
            bad()
    with pytest.raises(ValueError):
        Action("DELETE", step=0)
    assert isinstance(apply(initial(False), "FINISH"), str)


def random_line(rng: random.Random, canvas: Canvas) -> str:
    """An action biased toward ones that apply: DFA walks, in-range structured lines, near misses."""
    roll = rng.random()
    if roll < 0.35:
        return random_accepted(rng, close=0.3)
    if roll < 0.9:
        n = rng.randint(1, len(canvas.steps) + 1)
        verb = rng.choice(["ADD", "ADD", "DELETE", "SET_PROMPT", "ENSEMBLE", "ROUNDS"])
        if verb == "ADD":
            after = "" if rng.random() < 0.5 else f" AFTER {rng.randint(0, len(canvas.steps))}"
            return f"ADD {rng.choice(KINDS)}{after}"
        if verb == "SET_PROMPT":
            text = "".join(rng.choice(sorted(PROMPT_CHARS)) for _ in range(rng.randrange(30)))
            return f'SET_PROMPT {n} "{text}"'
        if verb == "DELETE":
            return f"DELETE {n}"
        return f"{verb} {n} {rng.randint(1, 5 if verb == 'ENSEMBLE' else 3)}"
    return mutate(rng, random_accepted(rng))


def test_random_action_sequences_never_crash_and_always_compile():
    rng = random.Random(20260214)
    compiled: dict[str, tuple[str, str]] = {}
    applied = rejected = 0
    for episode in range(800):
        canvas = initial(code=episode % 2 == 1)
        for _ in range(rng.randint(1, 20)):
            before = canonical(canvas)
            action = parse(random_line(rng, canvas))
            if isinstance(action, str):
                rejected += 1
                continue
            result = apply(canvas, action)
            if isinstance(result, str):
                assert result and canonical(canvas) == before
                rejected += 1
                continue
            applied += 1
            canvas = result
            key = canonical(canvas)
            if key not in compiled:
                compiled[key] = compiled_and_checked(canvas)
                assert len(render(canvas).splitlines()) == len(canvas.steps)
                assert from_canonical(key) == canvas
                assert canvas_of(*compiled[key]) == canvas
            assert compile(canvas, family_benchmark(canvas)) == compiled[key]  # deterministic
    print(f"{applied} applied, {rejected} rejected, {len(compiled)} distinct canvases compiled")
    assert applied > 2500 and rejected > 2500
    assert len(compiled) > 1000
    # canonical text <=> compiled workflow, over everything seen
    assert len(set(compiled.values())) == len(compiled)
    sources = "\n".join(graph for graph, _ in compiled.values())
    for shape in ("asyncio.gather", "self.sc_ensemble", "range(3)", "self.revise", "test_loop=3", "self.programmer",
                  "self.format", "self.custom_code_generate", "self.answer_generate", "self.custom("):
        assert shape in sources, shape


def test_compiled_prompt_file_is_only_string_constants():
    canvas = replay(initial(False), ["ADD CUSTOM", "ADD PROGRAM AFTER 1", "ADD REVIEW", 'SET_PROMPT 3 "Be brief."'])
    graph, prompt = compiled_and_checked(canvas)
    tree = ast.parse(prompt)
    assignments = tree.body[2:]
    assert tree.body[1].targets[0].id == "CANVAS" and tree.body[1].value.value == canonical(canvas)
    assert [a.targets[0].id for a in assignments] == ["STEP1", "STEP2", "STEP3"]
    assert [a.value.value for a in assignments] == [canvas.steps[i].prompt for i in range(3)]
    assert all(isinstance(a, ast.Assign) and isinstance(a.value, ast.Constant) for a in assignments)


def test_compile_refuses_the_other_family():
    with pytest.raises(ValueError):
        compile(initial(False), "humaneval")
    with pytest.raises(ValueError):
        compile(initial(True), "gsm8k")


# --------------------------------------------------------------------------- canonical form


def test_equivalent_edit_sequences_share_the_anchor_and_different_ones_do_not():
    base = initial(False)
    same = [
        (["ADD REVIEW", "ADD FORMAT"], ["ADD FORMAT", "ADD REVIEW AFTER 1"]),
        (["ENSEMBLE 1 3", "ENSEMBLE 1 1"], ["ADD CUSTOM", "DELETE 2"]),
        (['SET_PROMPT 1 "x"', 'SET_PROMPT 1 "Solve the problem step by step."', "ADD REVIEW", "ROUNDS 2 2"],
         ["ADD REVIEW", "ROUNDS 2 3", "ROUNDS 2 2"]),
        (["ADD CUSTOM AFTER 0", "DELETE 2", 'SET_PROMPT 1 "Be brief."'],
         ["ADD CUSTOM", 'SET_PROMPT 2 "Be brief."', "DELETE 1"]),
    ]
    for left, right in same:
        a, b = replay(base, left), replay(base, right)
        assert isinstance(a, Canvas) and isinstance(b, Canvas), (a, b)
        assert canonical(a) == canonical(b) and anchor(a) == anchor(b)
        assert compile(a, "gsm8k") == compile(b, "gsm8k")
    different = [
        replay(base, []), replay(base, ['SET_PROMPT 1 "Solve the problem step by step"']),
        replay(base, ["ADD REVIEW"]), replay(base, ["ADD REVIEW", "ROUNDS 2 2"]),
        replay(base, ["ADD REVIEW", "ADD FORMAT"]), replay(base, ["ADD FORMAT", "ADD REVIEW"]),
        replay(base, ["ENSEMBLE 1 2"]), replay(base, ["ENSEMBLE 1 3"]), replay(base, ['SET_PROMPT 1 ""']),
        replay(base, ["ADD ANSWER"]), replay(base, ["ADD CUSTOM", "ENSEMBLE 2 2"]),
    ]
    assert all(isinstance(c, Canvas) for c in different)
    assert len({anchor(c) for c in different}) == len(different)
    assert len({compile(c, "gsm8k") for c in different}) == len(different)
    assert anchor(initial(True)) != anchor(initial(False))


def test_render_numbers_one_line_per_step():
    canvas = replay(initial(False), ["ENSEMBLE 1 3", "ADD REVIEW", "ROUNDS 2 2", "ADD FORMAT"])
    assert render(canvas).splitlines() == [
        '1. ANSWER (ensemble of 3) "Solve the problem step by step."',
        "2. REVIEW (revise if the review fails, up to 2 rounds)",
        "3. FORMAT",
    ]


# --------------------------------------------------------------------------- hostile prompt text


@pytest.mark.parametrize("text", ['"""', "a\\nb", "line\nbreak", 'say "hi"', "{__import__('os')}", "\\x41"])
def test_hostile_prompt_text_is_rejected_by_the_grammar(text):
    line = f'SET_PROMPT 1 "{text}"'
    assert not GRAMMAR.accepts(line)
    assert isinstance(parse(line), str)


HOSTILE_BUT_ADMITTED = [
    "'''", "__import__('os').system('touch /tmp/canvas_pwned')", "'); import os; os.system('x'); ('",
    "''' + open('/etc/passwd').read() + '''", "```python import os```", "x' ; STEP2 = exec('1') #",
]


@pytest.mark.parametrize("text", HOSTILE_BUT_ADMITTED)
def test_hostile_prompt_text_ends_up_inert_in_a_string_literal(text):
    canvas = apply(initial(False), parse(f'SET_PROMPT 1 "{text}"'))
    assert isinstance(canvas, Canvas)
    graph, prompt = compiled_and_checked(canvas)
    assert text not in graph
    tree = ast.parse(prompt)
    assert len(tree.body) == 3 and all(isinstance(node, ast.Assign) for node in tree.body[1:])
    assert isinstance(tree.body[2].value, ast.Constant) and tree.body[2].value.value == text


def test_compiler_alone_keeps_any_text_inert():
    """Even past the grammar and the Step checks (forced in), a prompt stays a literal."""
    step = Step("CUSTOM", "ok")
    evil = '"""\nimport os\nos.system("x")\n"""\\'
    object.__setattr__(step, "prompt", evil)
    graph, prompt = compile(Canvas(False, (step,)), "gsm8k")
    from_source(graph, prompt)
    tree = ast.parse(prompt)
    assert tree.body[2].value.value == evil and "import os" not in graph


# --------------------------------------------------------------------------- sandbox runs


def _scripted_reply(problems):
    """Replies that depend on the operator's template and on which problem is asked about:
    the first GSM8K problem is answered right, the second wrong; code gets the reference."""

    def answer_for(content: str) -> str:
        for problem in problems:
            if problem.inputs["problem"][:80] in content:
                return problem.gold if problem is problems[0] or "entry_point" in problem.inputs else "-1"
        return "0"

    def reply(messages):
        content = messages[-1]["content"]
        routed = operator_reply(content, answer_for(content))
        if routed is not None:
            return routed
        if "defining `solve()`" in content:
            return f"```python\ndef solve():\n    return {answer_for(content)!r}\n```"
        for problem in problems:
            if "entry_point" in problem.inputs and problem.inputs["problem"][:80] in content:
                return f"```python\n{problem.gold}\n```"
        return f"<thought>steps</thought><answer>{answer_for(content)}</answer>"

    return reply


HAND_WRITTEN_ENSEMBLE = '''
import asyncio

from aflow_ops import AnswerGenerate, ScEnsemble

import prompt


class Workflow:
    def __init__(self):
        self.generate = AnswerGenerate()
        self.ensemble = ScEnsemble()

    async def __call__(self, problem):
        runs = await asyncio.gather(*(self.generate(input=prompt.REASON + "\\n\\n" + problem) for _ in range(3)))
        best = await self.ensemble(solutions=[r["answer"] for r in runs], problem=problem)
        return best["response"]
'''


@needs_linux
def test_canvases_run_in_the_sandbox_and_match_hand_written_workflows(data_dir, fake_openai):
    from aflow.benchmarks import get_benchmark, public_tests
    from aflow.config import LLMConfig
    from aflow.evaluate import run_problem
    from aflow.llm import LLMClient
    from aflow.sandbox import Sandbox
    from aflow.workflows import load_workflow

    gsm8k, humaneval = get_benchmark("gsm8k"), get_benchmark("humaneval")
    math_problems = gsm8k.load("validate", data_dir, limit=2)
    code_problems = humaneval.load("validate", data_dir, limit=1)
    tests = public_tests("humaneval", data_dir)
    fake_openai.reply = _scripted_reply(math_problems + code_problems)

    def canvas_code(lines, code=False):
        canvas = replay(initial(code), lines)
        assert isinstance(canvas, Canvas), canvas
        graph, prompt = compile(canvas, "humaneval" if code else "gsm8k")
        return from_source(graph, prompt, name="canvas:" + anchor(canvas))

    async def scores(workflow, bench, problems, bench_tests=None):
        fake_openai.reset()
        llm = LLMClient(LLMConfig(base_url=fake_openai.base_url, model="fake-model", cache=False))
        try:
            async with Sandbox() as sandbox:
                results = [await run_problem(bench, p, workflow, llm, bench_tests or {}, sandbox) for p in problems]
        finally:
            await llm.close()
        for record, _ in results:
            assert record.error is None, record.error
        prompts = sorted(r.body["messages"][-1]["content"] for r in fake_openai.chat_requests)
        return [record.score for record, _ in results], prompts

    hand_ensemble = from_source(HAND_WRITTEN_ENSEMBLE, 'REASON = "Solve the problem step by step."\n', name="hand")
    hostile = HOSTILE_BUT_ADMITTED[1]
    runs = {
        "cot": asyncio.run(scores(load_workflow("builtin:cot"), gsm8k, math_problems)),
        "canvas cot": asyncio.run(scores(canvas_code([]), gsm8k, math_problems)),
        "ensemble": asyncio.run(scores(hand_ensemble, gsm8k, math_problems)),
        "canvas ensemble": asyncio.run(scores(canvas_code(["ENSEMBLE 1 3"]), gsm8k, math_problems)),
        "canvas review": asyncio.run(scores(canvas_code(["ADD REVIEW", "ROUNDS 2 2", "ADD FORMAT"]), gsm8k,
                                            math_problems)),
        "canvas program": asyncio.run(scores(canvas_code(["ADD PROGRAM AFTER 0", "DELETE 2"]), gsm8k, math_problems)),
        "canvas hostile": asyncio.run(scores(canvas_code(["ADD CUSTOM", f'SET_PROMPT 2 "{hostile}"']), gsm8k,
                                             math_problems)),
        "code cot": asyncio.run(scores(load_workflow("builtin:cot"), humaneval, code_problems, tests)),
        "canvas code cot": asyncio.run(scores(canvas_code([], code=True), humaneval, code_problems, tests)),
        "canvas code loop": asyncio.run(scores(canvas_code(["ENSEMBLE 1 2", "ADD TEST", "ROUNDS 2 2", "ADD REVIEW"],
                                                           code=True), humaneval, code_problems, tests)),
    }
    assert runs["canvas cot"] == runs["cot"]  # same scores from the very same executor requests
    assert runs["canvas ensemble"] == runs["ensemble"]
    assert runs["canvas code cot"] == runs["code cot"]
    assert runs["cot"][0] == [1.0, 0.0] and runs["code cot"][0] == [1.0]
    assert runs["ensemble"][0] == [1.0, 0.0] and len(runs["ensemble"][1]) == 8  # 2 x (3 samples + ScEnsemble)
    review_prompts = runs["canvas review"][1]
    assert sum("Is this solution correct?" in p for p in review_prompts) == 4  # 2 rounds, review always fails
    assert sum("Review feedback:" in p for p in review_prompts) == 4
    assert runs["canvas review"][0] == [1.0, 0.0]
    assert runs["canvas program"][0] == [1.0, 0.0]
    assert any(hostile in p for p in runs["canvas hostile"][1])  # it reached the executor, as text
    assert runs["canvas code loop"][0] == [1.0]
    assert any("Candidate solutions" in p for p in runs["canvas code loop"][1])


def test_canvas_of_reads_only_the_compilers_own_output():
    """A round's graph.py gives its canvas back only when it is exactly the compiled text: a hand edit, a
    forged header or an ordinary workflow gives None (the search then treats it as a code workflow)."""
    canvas = replay(initial(False), ["ADD REVIEW", "ENSEMBLE 1 2"])
    graph, prompt = compile(canvas, "gsm8k")
    assert canvas_of(graph, prompt) == canvas
    assert canvas_of(graph.replace("range(1)", "range(2)"), prompt) is None  # edited graph, same canvas
    assert canvas_of(graph, prompt.replace("ANSWER x2", "ANSWER x3")) is None  # edited canvas, same graph
    assert canvas_of(graph, "def f(:") is None and canvas_of("", "") is None
    from aflow.workflows import load_workflow

    cot = load_workflow("builtin:cot")
    assert canvas_of(cot.graph, cot.prompt) is None
    for bad in ("canvas answer", "canvas answer\nREVIEW rounds=1", "canvas other\nANSWER \"x\"",
                'canvas answer\nANSWER  "x"', 'canvas answer\nANSWER x1 "x"'):
        assert isinstance(from_canonical(bad), str), bad


def test_project_canvas_applies_one_edit_and_says_why_not():
    from aflow.search.projection import project_canvas, tried_canvases

    start = initial(False)
    move = project_canvas("ENSEMBLE 1 3", start)
    assert move.is_valid and move.modification == "ENSEMBLE 1 3" and move.canvas.steps[0].samples == 3
    assert canvas_of(move.workflow.graph, move.workflow.prompt) == move.canvas
    chatty = project_canvas("I will add a review.\n```\nADD REVIEW\n```", start)
    assert chatty.is_valid and chatty.modification == "ADD REVIEW"
    finish = project_canvas("FINISH\n", start)
    assert finish.is_valid and finish.finish and finish.workflow is None and finish.canvas == start
    # "already tried" is exact: another spelling of the same workflow is the same try
    two_step = replay(start, ["ADD FORMAT"])
    tried = tried_canvases(two_step, ["ADD ANSWER AFTER 1"])
    again = project_canvas("ADD ANSWER AFTER 1", two_step, tried)
    assert not again.is_valid and "already tried" in again.reason
    for text, reason in [("DELETE 1", "only step"), ("ROUNDS 1 2", "only REVIEW and TEST"), ("blah", "unknown action"),
                         ("", "empty action"), ("ADD TEST", "not available for answer")]:
        move = project_canvas(text, start)
        assert not move.is_valid and reason in move.reason, (text, move.reason)
