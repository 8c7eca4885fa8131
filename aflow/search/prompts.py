"""What the optimizer reads when it expands a node."""

from __future__ import annotations

from aflow.operators import catalogue
from aflow.search.experience import Experience

# How a workflow is written: shared by every prompt that asks a model for one.
WORKFLOW_FORMAT = """A workflow is Python code:
graph.py defines `class Workflow` whose `async def __call__(self, problem{extra_args})` returns the
answer, calling operators imported from `aflow_ops`; prompt.py holds the prompt strings it uses
(imported as `import prompt`). Allowed imports: aflow_ops, prompt, asyncio, re, json, math, typing,
collections, itertools, functools, random, string.

Operators (construct with no arguments, e.g. `self.custom = Custom()`, then `await self.custom(...)`):
{operators}
"""

OPTIMIZER_PROMPT = """You improve agentic workflows for the {benchmark} benchmark. {workflow_format}
Current workflow (validation score {score:.4f}):
{workflow}

Modifications already tried from this workflow:
{experience}

Problems it currently gets wrong:
{failures}

Propose ONE new modification (not one already tried), then write the complete new files.
Answer exactly in this format:
<modification>one sentence: what you change and why</modification>
<graph>
the complete new graph.py
</graph>
<prompt>
the complete new prompt.py
</prompt>"""


EXPERIENCE_SHOWN = 10  # the latest records of a node: in RL a node collects hundreds over a run
MODIFICATION_CHARS = 200  # of each record's modification (the proposer's own sentence, any length)


def format_experience(records: list[Experience], limit: int = EXPERIENCE_SHOWN) -> str:
    """What was tried from this workflow, the latest `limit` records, each modification cut to
    MODIFICATION_CHARS: the prompt stays within the policy's window however long the search runs."""
    if not records:
        return "(none yet)"
    shown = records[-limit:]
    lines = [f"({len(records) - len(shown)} earlier attempts not shown)"] if len(shown) < len(records) else []
    for record in shown:
        verdict = "improved" if record.success else "did not improve"
        modification = " ".join(record.modification.split())[:MODIFICATION_CHARS]
        lines.append(f"- {modification} ({verdict}: {record.score_before:.4f} -> {record.score_after:.4f})")
    return "\n".join(lines)


def format_failures(failures: list[dict], limit: int = 3, chars: int = 400) -> str:
    if not failures:
        return "(none recorded)"
    parts = []
    for case in failures[:limit]:
        why = case.get("error") or case.get("score_reason") or f"score {case.get('score', 0):.2f}"
        parts.append(f"- input: {str(case.get('input', ''))[:chars]}\n  output: {str(case.get('output', ''))[:chars]}"
                     f"\n  problem: {str(why)[:300]}")
    return "\n".join(parts)


def workflow_block(graph: str, prompt: str) -> str:
    """A workflow as the tagged text every prompt shows (and the projection reads back)."""
    return f"<graph>\n{graph.strip()}\n</graph>\n<prompt>\n{prompt.strip()}\n</prompt>"


def workflow_format(code_benchmark: bool) -> str:
    return WORKFLOW_FORMAT.format(extra_args=", entry_point" if code_benchmark else "", operators=catalogue())


def optimizer_prompt(benchmark: str, graph: str, prompt: str, score: float, experience: list[Experience],
                     failures: list[dict], code_benchmark: bool = False) -> str:
    return OPTIMIZER_PROMPT.format(
        benchmark=benchmark, workflow_format=workflow_format(code_benchmark),
        score=score, workflow=workflow_block(graph, prompt), experience=format_experience(experience),
        failures=format_failures(failures),
    )


CANVAS_OPTIMIZER_PROMPT = """You improve agentic workflows for the {benchmark} benchmark by editing the workflow,
one edit per answer. The workflow runs its steps in order on each problem; each step sees the problem and
the solution so far.

Current workflow (validation score {score:.4f}):
{canvas}

{actions}

Edits already tried from this workflow:
{experience}

A problem it currently gets wrong:
{failures}

Answer with one action on one line and nothing else (FINISH to keep the workflow as it is)."""


def canvas_optimizer_prompt(benchmark: str, canvas, score: float, experience: list[Experience],
                            failures: list[dict]) -> str:
    """The canvas action space's optimizer prompt, shared by `aflow optimize --action-space canvas` and the
    RL environment's task mode. Short on purpose: the policy may be a 135M model with a 1k-token window."""
    from aflow.canvas import describe_actions, render

    return CANVAS_OPTIMIZER_PROMPT.format(
        benchmark=benchmark, score=score, canvas=render(canvas), actions=describe_actions(canvas.code),
        experience=format_experience(experience), failures=format_failures(failures, limit=1, chars=300),
    )
