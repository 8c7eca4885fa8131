"""Chain of thought: reason step by step, then keep the answer (or the extracted code)."""
from aflow_ops import AnswerGenerate, CustomCodeGenerate

import prompt


class Workflow:
    def __init__(self):
        self.answer = AnswerGenerate()
        self.code = CustomCodeGenerate()

    async def __call__(self, problem, entry_point=None):
        if entry_point:
            result = await self.code(problem=problem, entry_point=entry_point, instruction=prompt.CODE)
            return result["response"]
        result = await self.answer(input=prompt.REASON + "\n\n" + problem)
        return result["answer"]
