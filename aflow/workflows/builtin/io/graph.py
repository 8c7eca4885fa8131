"""IO: the executor answers the problem directly."""
from aflow_ops import Custom

import prompt


class Workflow:
    def __init__(self):
        self.custom = Custom()

    async def __call__(self, problem, entry_point=None):
        instruction = prompt.CODE if entry_point else prompt.ANSWER
        result = await self.custom(input=problem, instruction=instruction)
        return result["response"]
