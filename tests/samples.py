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
