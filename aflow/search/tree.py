"""One node per evaluated workflow; the tree is just the nodes and their parents."""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field


@dataclass
class Node:
    round: int
    graph: str
    prompt: str
    parent: int | None = None  # the round this one was derived from (None: the root)
    modification: str = ""
    scores: list[float] = field(default_factory=list)  # one per validation run
    cost_usd: float = 0.0
    calls: int = 0
    visits: int = 0  # times selected for expansion

    @property
    def mean(self) -> float:
        return statistics.fmean(self.scores) if self.scores else 0.0

    @property
    def std(self) -> float:
        return statistics.pstdev(self.scores) if len(self.scores) > 1 else 0.0

    def summary(self) -> dict:
        data = asdict(self)
        for key in ("graph", "prompt", "visits"):  # visits change later: kept in results.json
            data.pop(key)
        data.update(mean=round(self.mean, 6), std=round(self.std, 6))
        return data


class Tree:
    def __init__(self, nodes: list[Node] | None = None):
        self.nodes: dict[int, Node] = {n.round: n for n in nodes or []}

    def add(self, node: Node) -> None:
        self.nodes[node.round] = node

    @property
    def root(self) -> Node:
        return self.nodes[min(self.nodes)]

    def children(self, round_: int) -> list[Node]:
        return [n for n in self.nodes.values() if n.parent == round_]

    def ranked(self) -> list[Node]:
        """Best mean first; ties keep round order (as AFlow's sorted() does)."""
        return sorted(self.nodes.values(), key=lambda n: n.mean, reverse=True)

    def best(self) -> Node:
        return self.ranked()[0]

    def top_mean(self, k: int = 3) -> float:
        top = self.ranked()[:k]
        return statistics.fmean(n.mean for n in top) if top else 0.0
