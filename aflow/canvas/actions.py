"""The action language: one atomic canvas edit per turn, one short line.

Why so small: the designer is a 135M model. Each turn it emits one line from a fixed,
bounded vocabulary (single-digit numbers, seven step kinds, a quoted prompt of at most
MAX_PROMPT_CHARS characters from PROMPT_CHARS), which the environment parses, applies
and checks. A finite grammar (see `grammar.Grammar`) then lets decoding be constrained
so that every sampled line parses.

    ADD <KIND>                  append a step (KIND: CUSTOM ANSWER PROGRAM CODE REVIEW TEST FORMAT)
    ADD <KIND> AFTER <0-6>      insert it after step n (0: first)
    DELETE <1-6>                remove step n
    SET_PROMPT <1-6> "<text>"   set step n's instruction
    ENSEMBLE <1-6> <1-5>        run step n k times in parallel, then ScEnsemble (1: no ensemble)
    ROUNDS <1-6> <1-3>          a REVIEW or TEST step's maximum rounds
    FINISH                      stop editing

A line may end with one newline. `parse` and `apply` never raise: what cannot be done
comes back as a reason (a str) the environment can show the policy.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from aflow.canvas.model import (
    GENERATORS,
    KINDS,
    LOOPS,
    MAX_PROMPT_CHARS,
    MAX_ROUNDS,
    MAX_SAMPLES,
    MAX_STEPS,
    PROMPTABLE,
    Canvas,
    CanvasError,
    Step,
    kinds_for,
    prompt_problem,
)

VERBS = ("ADD", "DELETE", "SET_PROMPT", "ENSEMBLE", "ROUNDS", "FINISH")
MAX_ACTION_CHARS = 260  # longer than any line the grammar admits
USAGE = {
    "ADD": f"ADD <KIND> [AFTER <0-{MAX_STEPS}>] with KIND one of {' '.join(KINDS)}",
    "DELETE": f"DELETE <step 1-{MAX_STEPS}>",
    "SET_PROMPT": f'SET_PROMPT <step 1-{MAX_STEPS}> "<text>"',
    "ENSEMBLE": f"ENSEMBLE <step 1-{MAX_STEPS}> <samples 1-{MAX_SAMPLES}>",
    "ROUNDS": f"ROUNDS <step 1-{MAX_STEPS}> <rounds 1-{MAX_ROUNDS}>",
    "FINISH": "FINISH",
}
_STEP = f"([1-{MAX_STEPS}])"
_PATTERNS = {
    "ADD": re.compile(f"ADD ({'|'.join(KINDS)})(?: AFTER ([0-{MAX_STEPS}]))?"),
    "DELETE": re.compile(f"DELETE {_STEP}"),
    "SET_PROMPT": re.compile(f'SET_PROMPT {_STEP} "(.*)"', re.DOTALL),
    "ENSEMBLE": re.compile(f"ENSEMBLE {_STEP} ([1-{MAX_SAMPLES}])"),
    "ROUNDS": re.compile(f"ROUNDS {_STEP} ([1-{MAX_ROUNDS}])"),
    "FINISH": re.compile("FINISH"),
}


@dataclass(frozen=True)
class Action:
    """One parsed edit. `step`: the 1-based step it targets (ADD: the step it goes after, None
    for the end); `value`: samples (ENSEMBLE) or rounds (ROUNDS); `text`: SET_PROMPT's prompt.
    Constructing an action out of the language's bounds raises (so apply can trust it)."""

    verb: str
    kind: str | None = None
    step: int | None = None
    value: int | None = None
    text: str | None = None

    def __post_init__(self):
        problem = _field_problem(self)
        if problem:
            raise ValueError(f"invalid {self.verb} action: {problem}")

    def __str__(self) -> str:
        if self.verb == "ADD":
            return f"ADD {self.kind}" + ("" if self.step is None else f" AFTER {self.step}")
        if self.verb == "DELETE":
            return f"DELETE {self.step}"
        if self.verb == "SET_PROMPT":
            return f'SET_PROMPT {self.step} "{self.text}"'
        if self.verb in ("ENSEMBLE", "ROUNDS"):
            return f"{self.verb} {self.step} {self.value}"
        return "FINISH"


def _field_problem(a: Action) -> str | None:
    expected = {"ADD": ("kind", "step"), "DELETE": ("step",), "SET_PROMPT": ("step", "text"),
                "ENSEMBLE": ("step", "value"), "ROUNDS": ("step", "value"), "FINISH": ()}
    if a.verb not in expected:
        return "unknown verb"
    for name in ("kind", "step", "value", "text"):
        if name not in expected[a.verb] and getattr(a, name) is not None:
            return f"{name} does not apply"
    if a.verb == "ADD":
        if a.kind not in KINDS:
            return "unknown kind"
        if a.step is not None and (type(a.step) is not int or not 0 <= a.step <= MAX_STEPS):
            return "AFTER out of range"
        return None
    if a.verb == "FINISH":
        return None
    if type(a.step) is not int or not 1 <= a.step <= MAX_STEPS:
        return "step out of range"
    if a.verb == "SET_PROMPT":
        return prompt_problem(a.text)
    top = MAX_SAMPLES if a.verb == "ENSEMBLE" else MAX_ROUNDS
    if a.verb in ("ENSEMBLE", "ROUNDS") and (type(a.value) is not int or not 1 <= a.value <= top):
        return "value out of range"
    return None


def parse(text) -> Action | str:
    """One line of the action language -> an Action, or the reason it is not one."""
    if not isinstance(text, str):
        return "the action must be text"
    if len(text) > MAX_ACTION_CHARS:
        return f"the action is {len(text)} characters long (at most {MAX_ACTION_CHARS})"
    line = text[:-1] if text.endswith("\n") else text
    if not line:
        return f"empty action: write one of {', '.join(VERBS)}"
    if "\n" in line:
        return "write exactly one action, on one line"
    verb = line.split(" ", 1)[0]
    if verb not in VERBS:
        return f"unknown action '{verb[:20]}': write one of {', '.join(VERBS)}"
    match = _PATTERNS[verb].fullmatch(line)
    if match is None:
        return f"malformed {verb}: write {USAGE[verb]}"
    groups = match.groups()
    if verb == "ADD":
        return Action("ADD", kind=groups[0], step=None if groups[1] is None else int(groups[1]))
    if verb == "DELETE":
        return Action("DELETE", step=int(groups[0]))
    if verb == "SET_PROMPT":
        problem = prompt_problem(groups[1])
        if problem:
            return f"bad SET_PROMPT: {problem}"
        return Action("SET_PROMPT", step=int(groups[0]), text=groups[1])
    if verb in ("ENSEMBLE", "ROUNDS"):
        return Action(verb, step=int(groups[0]), value=int(groups[1]))
    return Action("FINISH")


def apply(canvas: Canvas, action: Action) -> Canvas | str:
    """The canvas after `action`, or the reason it cannot be applied. FINISH returns the canvas."""
    if not isinstance(canvas, Canvas) or not isinstance(action, Action):
        return "apply() takes a Canvas and an Action"
    steps = list(canvas.steps)
    try:
        if action.verb == "FINISH":
            return canvas
        if action.verb == "ADD":
            if action.kind not in kinds_for(canvas.code):
                family = "code" if canvas.code else "answer"
                return (f"{action.kind} is not available for {family} benchmarks "
                        f"(use: {', '.join(k for k in KINDS if k in kinds_for(canvas.code))})")
            if len(steps) >= MAX_STEPS:
                return f"the workflow already has the maximum of {MAX_STEPS} steps"
            where = len(steps) if action.step is None else action.step
            if where > len(steps):
                return f"AFTER {where}: the workflow has only {len(steps)} step{'s' * (len(steps) > 1)}"
            steps.insert(where, Step.new(action.kind, canvas.code))
            return canvas.with_steps(steps)
        n = action.step
        if n > len(steps):
            return f"there is no step {n}: the workflow has {len(steps)} step{'s' * (len(steps) > 1)}"
        step = steps[n - 1]
        if action.verb == "DELETE":
            if len(steps) == 1:
                return "cannot delete the only step"
            del steps[n - 1]
            return canvas.with_steps(steps)
        if action.verb == "SET_PROMPT":
            if step.kind not in PROMPTABLE:
                return f"step {n} is {step.kind}, which takes no prompt"
            new = Step(step.kind, action.text, step.samples, step.rounds)
        elif action.verb == "ENSEMBLE":
            if step.kind not in GENERATORS:
                return f"step {n} is {step.kind}; only {', '.join(GENERATORS)} steps can be ensembled"
            new = Step(step.kind, step.prompt, action.value, step.rounds)
        else:  # ROUNDS
            if step.kind not in LOOPS:
                return f"step {n} is {step.kind}; only REVIEW and TEST steps have rounds"
            new = Step(step.kind, step.prompt, step.samples, action.value)
        if new == step:
            return f"{action.verb} leaves step {n} unchanged"
        steps[n - 1] = new
        return canvas.with_steps(steps)
    except CanvasError as exc:
        return str(exc)


KIND_HELP = {
    "CUSTOM": "Custom: answers with the step's prompt as its instruction",
    "ANSWER": "AnswerGenerate: reasons step by step, keeps only the final answer",
    "PROGRAM": "Programmer: writes and runs Python to compute the answer",
    "CODE": "CustomCodeGenerate: writes the complete function",
    "REVIEW": "Review, and Revise only if the review fails (ROUNDS: how many times)",
    "TEST": "Test on the public tests, fix on failure (ROUNDS: how many times)",
    "FORMAT": "Format: reduces the solution to the bare final answer",
}


def describe_actions(code: bool) -> str:
    """The action language for one benchmark family, as the policy's instructions would show it."""
    kinds = [k for k in KINDS if k in kinds_for(code)]
    lines = ["One action per turn, on one line:"]
    lines += [f"  ADD <KIND> [AFTER <0-{MAX_STEPS}>]" if verb == "ADD" else f"  {USAGE[verb]}" for verb in VERBS]
    lines.append("Step kinds (KIND):")
    lines += [f"  {kind}: {KIND_HELP[kind]}" for kind in kinds]
    lines.append(f'Prompts: at most {MAX_PROMPT_CHARS} characters, no double quote, backslash or newline.')
    return "\n".join(lines)


def replay(canvas: Canvas, lines) -> Canvas | str:
    """Apply actions (lines of text) in order; the first failure's reason, prefixed by its line."""
    for number, line in enumerate(lines, 1):
        action = parse(line)
        if isinstance(action, str):
            return f"line {number}: {action}"
        result = apply(canvas, action)
        if isinstance(result, str):
            return f"line {number}: {result}"
        canvas = result
    return canvas
