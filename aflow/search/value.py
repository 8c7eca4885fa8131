"""Value providers: an estimate Q(node) ∈ [0, 1] of how promising a node is to expand."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from aflow.benchmarks.scoring import last_number
from aflow.llm import LLMClient
from aflow.search.experience import ExperiencePool
from aflow.search.tree import Node

NEUTRAL = 0.5


def empirical(pool: ExperiencePool) -> Callable[[Node], float]:
    """0.5 + the mean score change of the node's children (scores in [0, 1]); 0.5 when untried."""

    def value(node: Node) -> float:
        delta = pool.mean_improvement(node.round)
        return NEUTRAL if delta is None else min(1.0, max(0.0, NEUTRAL + delta))

    return value


VALUE_PROMPT = """You judge agentic workflows. Below is a workflow (graph.py and prompt.py) and its
validation score. How likely is it that one modification of this workflow improves its score?
Answer with a single number between 0 and 1.

Score: {score:.4f}
graph.py:
{graph}
prompt.py:
{prompt}
"""


class ModelValue:
    """Ask an OpenAI-compatible endpoint (e.g. the trained policy on vLLM) for Q(node).

    Values are computed ahead of selection (`prefetch`) because selection itself is
    synchronous; an unparseable or failed answer counts as neutral and is recorded."""

    def __init__(self, llm: LLMClient):
        self.llm = llm
        self.values: dict[int, float] = {}
        self.failures: list[str] = []

    async def prefetch(self, nodes: list[Node]) -> None:
        missing = [n for n in nodes if n.round not in self.values]
        answers = await asyncio.gather(*(self._ask(n) for n in missing), return_exceptions=True)
        for node, answer in zip(missing, answers, strict=True):
            if isinstance(answer, BaseException):
                self.failures.append(f"round {node.round}: {answer}")
                answer = NEUTRAL
            self.values[node.round] = answer

    async def _ask(self, node: Node) -> float:
        prompt = VALUE_PROMPT.format(score=node.mean, graph=node.graph, prompt=node.prompt)
        completion = await self.llm.chat([{"role": "user", "content": prompt}], max_tokens=16)
        number = last_number(completion.text)
        return NEUTRAL if number is None else min(1.0, max(0.0, number))

    def __call__(self, node: Node) -> float:
        return self.values.get(node.round, NEUTRAL)
