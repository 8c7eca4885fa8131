"""Gold: returns the reference answer it is handed. Checks loading, the sandbox and scoring without an LLM."""


class Workflow:
    def __init__(self):
        pass

    async def __call__(self, problem, gold=None, entry_point=None):
        return gold
