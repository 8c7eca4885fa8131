"""Workflow texts the RL tests act with: one valid native graph, and an answer in the tagged format."""

GRAPH = """from aflow_ops import Custom
import prompt


class Workflow:
    def __init__(self):
        self.custom = Custom()

    async def __call__(self, problem):
        result = await self.custom(input=problem, instruction=prompt.STYLE)
        return result["response"]
"""


def action(n: int, instruction: str = "Give only the final number.") -> str:
    """A valid optimizer/policy answer whose modification and prompt differ with n."""
    return (f"<modification>Answer style {n}.</modification><graph>{GRAPH}</graph>"
            f"<prompt>STYLE = '{instruction} v{n}'</prompt>")


def operator_reply(content: str, answer: str) -> str | None:
    """A scripted executor's reply to the operators whose template it recognises in `content` (ScEnsemble,
    Review that always fails, Revise, Format), giving `answer` where one is asked for; None for the others
    (the generators), which each test answers its own way."""
    if "<solution_letter>" in content:
        return "<solution_letter>B</solution_letter>"
    if "Is this solution correct?" in content:
        return "<review_result>false</review_result><feedback>Check again.</feedback>"
    if "Review feedback:" in content:
        return f"<solution>{answer}</solution>"
    if "Give only the final answer" in content:  # Format
        return answer
    return None


def small_split(data_dir, target, benchmark: str = "gsm8k", n: int = 6):
    """A data directory at `target` whose validate and test splits are the first `n` rows of the real
    ones: with env.feedback_size=2 and env.eval_subset_size=n-2, every step's sample is the whole pool."""
    from pathlib import Path

    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    for split in ("validate", "test"):
        lines = (Path(data_dir) / f"{benchmark}_{split}.jsonl").read_text().splitlines()[:n]
        (target / f"{benchmark}_{split}.jsonl").write_text("\n".join(lines) + "\n")
    return target
