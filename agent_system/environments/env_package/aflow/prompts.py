"""What the policy reads. Task mode reuses `aflow optimize`'s optimizer prompt (the code one or the
canvas one, per env.action_space), so a policy trained here is prompted the same way when it later
serves as the optimizer of a search."""

from __future__ import annotations

from aflow.canvas import describe_actions, render
from aflow.search.prompts import optimizer_prompt, workflow_block, workflow_format

PROBLEM_CHARS = 6000  # of a query-mode problem shown to the policy

QUERY_PROMPT = """Write an agentic workflow that solves this {benchmark} problem. {workflow_format}
Problem:
{problem}

A workflow to start from:
{workflow}
{feedback}
Answer exactly in this format:
<modification>one sentence: what your workflow does</modification>
<graph>
the complete graph.py
</graph>
<prompt>
the complete prompt.py
</prompt>"""


def task_observation(benchmark: str, graph: str, prompt: str, score: float, experience, failures,
                     code_benchmark: bool) -> str:
    return optimizer_prompt(benchmark, graph, prompt, score, experience, failures, code_benchmark)


def query_observation(benchmark: str, problem: str, graph: str, prompt: str, code_benchmark: bool,
                      feedback: str = "") -> str:
    return QUERY_PROMPT.format(benchmark=benchmark, workflow_format=workflow_format(code_benchmark),
                               problem=problem[:PROBLEM_CHARS], workflow=workflow_block(graph, prompt), feedback=f"\n{feedback}\n" if feedback else "")


def turn_feedback(reward: float, reason: str, score: float | None) -> str:
    """The environment's reply after a turn, appended to the conversation (masked as env tokens)."""
    if reason:
        return f"Your answer was rejected: {reason}. Reply again in the required format."
    return f"The new workflow scored {score:.4f} (change {reward:+.4f}). Propose the next modification."


def continuation(turn, current, mode: str) -> str:
    """The environment's reply after a turn (its tokens are masked 0 in training)."""
    feedback = turn_feedback(turn.reward, turn.reason, turn.score)
    if not turn.valid or mode == "query":
        return feedback
    failures = "\n".join(f"- {str(f.get('input', ''))[:300]} -> {str(f.get('output', ''))[:200]}"
                          for f in current.failures[:2]) or "(none)"
    return (f"{feedback}\nCurrent workflow (score {current.score:.4f}) is the one you just wrote. "
            f"Problems it still gets wrong:\n{failures}\nAnswer in the same format.")


# ---- the canvas action space (env.action_space=canvas) ----
# Task mode's observation is aflow.search.prompts.canvas_optimizer_prompt (the optimizer's own); query mode has
# its own short prompt: the policy may be SmolLM2-135M with a ~1k-token window.

QUERY_CANVAS_PROMPT = """Design a workflow that solves this {benchmark} problem, one edit per answer. The workflow runs
its steps in order; each step sees the problem and the solution so far.

Problem:
{problem}

Current workflow:
{canvas}

{actions}

Answer with one action on one line and nothing else (FINISH when the workflow is ready)."""


def query_canvas_observation(benchmark: str, problem: str, canvas) -> str:
    return QUERY_CANVAS_PROMPT.format(benchmark=benchmark, problem=problem[:PROBLEM_CHARS], canvas=render(canvas),
                                      actions=describe_actions(canvas.code))


def canvas_continuation(turn, canvas, mode: str) -> str:
    """The reply after a canvas turn: the rejection reason, or the edited workflow (the policy did not
    write it out, so it is shown again) and, in task mode, what the edit scored."""
    if not turn.valid:
        return f"Your action was rejected: {turn.reason}. Answer with one action on one line."
    scored = f" The new workflow scored {turn.score:.4f} (change {turn.reward:+.4f})." if mode == "task" else ""
    ready = "FINISH to keep it" if mode == "task" else "FINISH when the workflow is ready"
    return f"Applied: {turn.modification}.{scored}\nCurrent workflow:\n{render(canvas)}\nNext action ({ready}):"
