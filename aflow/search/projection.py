"""Optimizer text -> an action. One module, used by `aflow optimize` and by the RL environment.

Two action spaces: `project` reads a whole workflow (code), `project_canvas` one canvas edit.

The optimizer (a big LLM, or the policy being trained) answers in tags:

    <modification>one sentence: what changes and why</modification>
    <graph>the full graph.py</graph>
    <prompt>the full prompt.py</prompt>

Anything else is tolerated where the intent is clear (code fences inside tags, a missing
<prompt> meaning "keep the parent's", a bare ```python block defining class Workflow) and
rejected with a reason otherwise. Never raises.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from aflow import canvas, parsing
from aflow.canvas import Canvas
from aflow.workflows import WorkflowCheckError, WorkflowCode, from_source

MAX_ANSWER_CHARS = 200_000


@dataclass(frozen=True)
class Action:
    modification: str
    graph: str
    prompt: str
    is_valid: bool
    reason: str = ""  # why it was rejected
    workflow: WorkflowCode | None = None  # the checked (and, for AFlow rounds, converted) code


def normalize_modification(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).strip()


def _code_in(text: str | None) -> str | None:
    if text is None:
        return None
    blocks = parsing.code_blocks(text)
    return (blocks[0] if blocks else text).strip("\n")


def project(text: str, parent_graph: str = "", parent_prompt: str = "",
            tried: set[str] | frozenset[str] = frozenset()) -> Action:
    """Parse and check one optimizer answer against its parent and what was tried from it."""
    text = str(text or "")
    if len(text) > MAX_ANSWER_CHARS:
        return Action("", "", "", False, f"answer is {len(text)} characters (limit {MAX_ANSWER_CHARS})")
    tagged = parsing.extract_tag(text, "modification")
    modification = (tagged or "").strip()
    graph = _code_in(parsing.extract_tag(text, "graph"))
    if graph is None:
        defining = [b for b in parsing.code_blocks(text) if "class Workflow" in b]
        graph = defining[0].strip("\n") if defining else None
    if not graph:
        return Action(modification, "", "", False, "no <graph> with a class Workflow in the answer")
    prompt = _code_in(parsing.extract_tag(text, "prompt"))
    prompt = parent_prompt if prompt is None else prompt
    if tagged is None:  # no tag at all: the leading sentence of prose describes the change
        before = re.sub(r"<[^>]*>", "", text.split("<graph>")[0].split("```")[0]).strip()
        modification = before.splitlines()[0][:300] if before else ""
    if not modification:
        return Action("", graph, prompt, False, "no <modification> describing the change")
    if normalize_modification(modification) in tried:
        return Action(modification, graph, prompt, False, "this modification was already tried from this node")
    if graph.strip() == parent_graph.strip() and prompt.strip() == parent_prompt.strip():
        return Action(modification, graph, prompt, False, "graph and prompt are unchanged from the parent")
    try:
        workflow = from_source(graph, prompt, name="candidate")
    except WorkflowCheckError as exc:
        return Action(modification, graph, prompt, False, f"rejected by the static checks: {exc}")
    return Action(modification, graph, prompt, True, "", workflow)


@dataclass(frozen=True)
class CanvasMove:
    """One answer in the canvas action space, checked against the canvas it edits.

    `modification` is the action as the language writes it (e.g. "ENSEMBLE 1 3"): it is what the
    experience records, and replaying it on the parent gives the child exactly. FINISH is valid
    and carries the parent canvas and no workflow: the caller ends the episode or round."""

    modification: str
    canvas: Canvas | None
    is_valid: bool
    reason: str = ""
    finish: bool = False
    workflow: WorkflowCode | None = None


# Why an answer was rejected, as a few kinds (training metrics `rejected_<kind>`, expansions.jsonl "rejection"):
# checked in this order, by the phrases of the reasons aflow.canvas and this module give.
REJECTION_KINDS = {
    "unparsable": ("unknown action", "unknown verb", "unknown kind", "malformed", "empty action", "exactly one action",
                   "characters", "must be text", "bad SET_PROMPT", "missing <", "no <"),
    "not_applicable": ("takes no prompt", "can be ensembled", "have rounds", "the only step", "maximum of",
                       "does not apply", "value out of range", "FINISH is not an edit"),
    "no_such_step": ("there is no step", "the workflow has only", "out of range"),
    "no_change": ("unchanged", "already tried"),
}


def rejection_kind(reason: str) -> str:
    """The kind of a rejection reason: one of REJECTION_KINDS, else "other" (e.g. a failed static check)."""
    for kind, phrases in REJECTION_KINDS.items():
        if any(phrase in reason for phrase in phrases):
            return kind
    return "other"


def _action_line(text: str) -> canvas.Action | str:
    """The answer's action: the whole text when it is one line of the language (what constrained
    decoding produces), else the first line that is one (a big optimizer model may add prose)."""
    whole = canvas.parse(text.strip())
    if not isinstance(whole, str):
        return whole
    for line in text.splitlines():
        line = line.strip().strip("`").strip()
        if line.split(" ", 1)[0] in canvas.VERBS:
            action = canvas.parse(line)
            if not isinstance(action, str):
                return action
    return whole


def tried_canvases(parent: Canvas, modifications) -> set[str]:
    """Canonical texts of the canvases the recorded modifications made from `parent`: "already tried"
    is then exact (two edits that give the same workflow are the same try)."""
    tried = set()
    for modification in modifications:
        child = canvas.replay(parent, [modification])
        if not isinstance(child, str):
            tried.add(canvas.canonical(child))
    return tried


def project_canvas(text: str, parent: Canvas, tried: set[str] | frozenset[str] = frozenset()) -> CanvasMove:
    """Parse, apply and compile one canvas answer (one action line). Never raises."""
    text = str(text or "")
    if len(text) > MAX_ANSWER_CHARS:
        return CanvasMove("", None, False, f"answer is {len(text)} characters (limit {MAX_ANSWER_CHARS})")
    action = _action_line(text)
    if isinstance(action, str):
        return CanvasMove("", None, False, action)
    modification = str(action)
    if action.verb == "FINISH":
        return CanvasMove(modification, parent, True, finish=True)
    child = canvas.apply(parent, action)
    if isinstance(child, str):
        return CanvasMove(modification, None, False, child)
    if child == parent:
        return CanvasMove(modification, child, False, "the edit leaves the workflow unchanged")
    if canvas.canonical(child) in tried:
        return CanvasMove(modification, child, False, "this edit gives a workflow already tried from this one")
    graph, prompt = canvas.compile_canvas(child, child.code)
    try:
        workflow = from_source(graph, prompt, name="candidate")
    except WorkflowCheckError as exc:  # a compiler defect: recorded, never raised
        return CanvasMove(modification, child, False, f"the compiled canvas failed the static checks: {exc}")
    return CanvasMove(modification, child, True, "", False, workflow)
