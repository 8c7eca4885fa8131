"""The canvas: a typed, immutable workflow graph over the operator registry.

Why a canvas: a 135M policy cannot write `graph.py`, but it can pick one small edit per
turn. The canvas is the state those edits act on. It is an ordered pipeline of steps
that thread one running `solution` from the problem to the answer, and it covers the
shapes AFlow's round files use:

* a generator step calls one operator on the problem (and, after the first step, on the
  draft solution so far): CUSTOM (Custom with an instruction), ANSWER (AnswerGenerate),
  PROGRAM (Programmer), CODE (CustomCodeGenerate);
* any generator step can be an ensemble: `samples` (2..5) parallel calls, then ScEnsemble;
* REVIEW is a review/revise loop with a condition: Review the solution, and only when the
  review fails Revise it, for up to `rounds` rounds (rounds=1 is the plain conditional);
* TEST is the test/fix loop of code benchmarks: Test runs the public tests and repairs a
  failing solution, up to `rounds` times;
* FORMAT reduces the solution to its bare final answer;
* promptable steps carry their own instruction text (prompt.py constants).

Invariants are checked on construction, so every canvas that exists compiles: 1..MAX_STEPS
steps, the first a generator (there is no solution to refine before it), each kind allowed
in the canvas's family (`code` for code benchmarks, where the workflow gets `entry_point`),
parameters in range, prompt text short and in a restricted character set.
"""

from __future__ import annotations

import hashlib
import re
import string
from dataclasses import dataclass, field, replace

MAX_STEPS = 6
MAX_SAMPLES = 5
MAX_ROUNDS = 3
MAX_PROMPT_CHARS = 200
# Prompt text: no quote, backslash, newline or braces, so it can never close the quoted
# action, and it is plain data wherever it ends up (prompt.py holds it as a repr() literal).
PROMPT_CHARS = frozenset(string.ascii_letters + string.digits + " .,;:!?'()-/%+*=<>_#&[]`")

GENERATORS = ("CUSTOM", "ANSWER", "PROGRAM", "CODE")
REFINERS = ("REVIEW", "TEST", "FORMAT")
KINDS = GENERATORS + REFINERS
LOOPS = frozenset({"REVIEW", "TEST"})
PROMPTABLE = frozenset({"CUSTOM", "ANSWER", "PROGRAM", "CODE"})
# The operators each kind calls (an ensemble adds ScEnsemble).
OPERATORS_OF = {
    "CUSTOM": ("Custom",), "ANSWER": ("AnswerGenerate",), "PROGRAM": ("Programmer",),
    "CODE": ("CustomCodeGenerate",), "REVIEW": ("Review", "Revise"), "TEST": ("Test",), "FORMAT": ("Format",),
}
ANSWER_KINDS = frozenset({"CUSTOM", "ANSWER", "PROGRAM", "REVIEW", "FORMAT"})
CODE_KINDS = frozenset({"CUSTOM", "CODE", "REVIEW", "TEST"})

DEFAULT_PROMPTS = {
    False: {"CUSTOM": "Solve the problem step by step. End with the final answer.",
            "ANSWER": "Solve the problem step by step.", "PROGRAM": "", "CODE": ""},
    True: {"CUSTOM": "Complete the Python function. Reply with the complete function in one ```python block.",
           "ANSWER": "", "PROGRAM": "",
           "CODE": "Think about the edge cases first, then write the function."},
}


class CanvasError(ValueError):
    """A canvas or step that breaks an invariant (apply() turns these into reasons)."""


def prompt_problem(text: str) -> str | None:
    """Why `text` cannot be a step's prompt, or None when it can."""
    if not isinstance(text, str):
        return "a prompt is text"
    if len(text) > MAX_PROMPT_CHARS:
        return f"a prompt has at most {MAX_PROMPT_CHARS} characters (this one has {len(text)})"
    bad = sorted({c for c in text if c not in PROMPT_CHARS})
    if bad:
        return f"a prompt may not contain {', '.join(repr(c) for c in bad[:5])}"
    return None


def kinds_for(code: bool) -> frozenset[str]:
    return CODE_KINDS if code else ANSWER_KINDS


@dataclass(frozen=True)
class Step:
    """One pipeline step. Fields that do not apply to the kind keep their neutral value
    (prompt "", samples 1, rounds 0), so equal steps are exactly equal dataclasses."""

    kind: str
    prompt: str = ""
    samples: int = 1  # generators: parallel samples, then ScEnsemble when > 1
    rounds: int = 0  # loops (REVIEW, TEST): 1..MAX_ROUNDS

    def __post_init__(self):
        if self.kind not in KINDS:
            raise CanvasError(f"unknown step kind '{self.kind}' (choose from: {', '.join(KINDS)})")
        if self.kind not in PROMPTABLE and self.prompt:
            raise CanvasError(f"{self.kind} takes no prompt")
        problem = prompt_problem(self.prompt)
        if problem:
            raise CanvasError(problem)
        if type(self.samples) is not int or not (1 <= self.samples <= MAX_SAMPLES):
            raise CanvasError(f"samples must be 1..{MAX_SAMPLES}")
        if self.kind not in GENERATORS and self.samples != 1:
            raise CanvasError(f"{self.kind} cannot be ensembled")
        if self.kind in LOOPS:
            if type(self.rounds) is not int or not (1 <= self.rounds <= MAX_ROUNDS):
                raise CanvasError(f"rounds must be 1..{MAX_ROUNDS}")
        elif self.rounds != 0:
            raise CanvasError(f"{self.kind} has no rounds")

    @staticmethod
    def new(kind: str, code: bool) -> Step:
        """A fresh step of `kind` with its defaults (what `ADD kind` inserts)."""
        return Step(kind, DEFAULT_PROMPTS[code].get(kind, ""), 1, 1 if kind in LOOPS else 0)

    @property
    def is_generator(self) -> bool:
        return self.kind in GENERATORS


@dataclass(frozen=True)
class Canvas:
    """A workflow as data. `code`: the family (code benchmarks get `entry_point` and TEST)."""

    code: bool
    steps: tuple[Step, ...] = field(default_factory=tuple)

    def __post_init__(self):
        if not isinstance(self.steps, tuple) or not all(isinstance(s, Step) for s in self.steps):
            raise CanvasError("steps must be a tuple of Step")
        if not (1 <= len(self.steps) <= MAX_STEPS):
            raise CanvasError(f"a canvas has 1..{MAX_STEPS} steps")
        if not self.steps[0].is_generator:
            raise CanvasError(f"the first step must produce a solution ({', '.join(GENERATORS)}), "
                              f"not {self.steps[0].kind}")
        allowed = kinds_for(self.code)
        for step in self.steps:
            if step.kind not in allowed:
                family = "code" if self.code else "answer"
                raise CanvasError(f"{step.kind} is not available for {family} benchmarks "
                                  f"(use: {', '.join(k for k in KINDS if k in allowed)})")

    def with_steps(self, steps) -> Canvas:
        return replace(self, steps=tuple(steps))


def initial(code: bool) -> Canvas:
    """The starting canvas: chain of thought, the same workflow as `builtin:cot` for the family."""
    return Canvas(code, (Step.new("CODE" if code else "ANSWER", code),))


def _step_text(step: Step) -> str:
    parts = [step.kind]
    if step.samples > 1:
        parts.append(f"x{step.samples}")
    if step.rounds:
        parts.append(f"rounds={step.rounds}")
    if step.kind in PROMPTABLE:
        parts.append(f'"{step.prompt}"')  # the charset has no quote: this is unambiguous
    return " ".join(parts)


def canonical(canvas: Canvas) -> str:
    """The canvas as text, with nothing a compiled workflow does not depend on: compile() is a
    function of exactly these fields, so equal text <=> the same graph.py and prompt.py."""
    family = "code" if canvas.code else "answer"
    return "\n".join([f"canvas {family}"] + [_step_text(s) for s in canvas.steps])


def from_canonical(text: str) -> Canvas | str:
    """canonical()'s inverse: the Canvas a canonical text describes, or why it describes none."""
    if not isinstance(text, str):
        return "a canonical canvas is text"
    lines = text.strip("\n").split("\n")
    head = lines[0] if lines else ""
    if head not in ("canvas answer", "canvas code"):
        return "a canonical canvas starts with 'canvas answer' or 'canvas code'"
    steps = []
    for line in lines[1:]:
        match = _STEP_LINE.fullmatch(line)
        if match is None:
            return f"not a canonical step: {line[:80]!r}"
        kind, samples, rounds, prompt = match.groups()
        try:
            steps.append(Step(kind, prompt or "", int(samples or 1), int(rounds or 0)))
        except CanvasError as exc:
            return str(exc)
    try:
        canvas = Canvas(head == "canvas code", tuple(steps))
    except CanvasError as exc:
        return str(exc)
    return canvas if canonical(canvas) == text.strip("\n") else "not in canonical form"


_STEP_LINE = re.compile(r'([A-Z]+)(?: x([0-9]))?(?: rounds=([0-9]))?(?: "([^"]*)")?')


def anchor(canvas: Canvas) -> str:
    """A short hash of canonical(): turns acting on the same workflow share it (GiGPO)."""
    return hashlib.sha256(canonical(canvas).encode()).hexdigest()[:16]


def render(canvas: Canvas) -> str:
    """What the policy reads: numbered steps, one line each, in the action language's words."""
    lines = []
    for n, step in enumerate(canvas.steps, 1):
        extra = []
        if step.samples > 1:
            extra.append(f"ensemble of {step.samples}")
        if step.kind == "REVIEW":
            extra.append(f"revise if the review fails, up to {step.rounds} round{'s' * (step.rounds > 1)}")
        if step.kind == "TEST":
            extra.append(f"fix failing tests, up to {step.rounds} round{'s' * (step.rounds > 1)}")
        text = f"{n}. {step.kind}"
        if extra:
            text += f" ({'; '.join(extra)})"
        if step.kind in PROMPTABLE:
            text += f' "{step.prompt}"'
        lines.append(text)
    return "\n".join(lines)
