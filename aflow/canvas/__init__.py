"""The workflow canvas: an action space a small policy can use to design workflows.

Instead of writing `graph.py` the designer edits a canvas (`model.Canvas`), one atomic
action per turn (`actions`: a one-line language, `grammar.Grammar`: its DFA for constrained
decoding), and the canvas compiles (`compiler`) to an ordinary AFlow-native workflow that
the static checks, the sandbox and `run_problem` take like any other.

    canvas = initial(code=False)                     # chain of thought
    action = parse('ENSEMBLE 1 3')                   # Action, or a reason (str)
    canvas = apply(canvas, action)                   # Canvas, or a reason (str)
    graph, prompt = compile(canvas, "gsm8k")         # graph.py, prompt.py
    render(canvas), canonical(canvas), anchor(canvas)
"""

from aflow.canvas.actions import MAX_ACTION_CHARS, USAGE, VERBS, Action, apply, describe_actions, parse, replay
from aflow.canvas.compiler import canvas_of, compile, compile_canvas
from aflow.canvas.grammar import Grammar
from aflow.canvas.model import (
    KINDS,
    MAX_PROMPT_CHARS,
    MAX_ROUNDS,
    MAX_SAMPLES,
    MAX_STEPS,
    PROMPT_CHARS,
    Canvas,
    CanvasError,
    Step,
    anchor,
    canonical,
    from_canonical,
    initial,
    kinds_for,
    render,
)

__all__ = [
    "KINDS", "MAX_ACTION_CHARS", "MAX_PROMPT_CHARS", "MAX_ROUNDS", "MAX_SAMPLES", "MAX_STEPS", "PROMPT_CHARS",
    "USAGE", "VERBS", "Action", "Canvas", "CanvasError", "Grammar", "Step", "anchor", "apply", "canonical",
    "canvas_of", "compile", "compile_canvas", "describe_actions", "from_canonical", "initial", "kinds_for", "parse",
    "render", "replay",
]
