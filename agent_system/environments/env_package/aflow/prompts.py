"""What the policy reads. Task mode reuses `aflow optimize`'s optimizer prompt, so a policy
trained here is prompted the same way when it later serves as the optimizer of a search."""

from __future__ import annotations

from aflow.search.prompts import optimizer_prompt, workflow_block, workflow_format

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
                               problem=problem[:6000], workflow=workflow_block(graph, prompt), feedback=f"\n{feedback}\n" if feedback else "")


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
