"""Which node to expand next.

AFlow's rule (MetaGPT `DataUtils.get_top_rounds` + `select_round`): candidates are the root
and then the best other nodes by mean score, `k` in all; each gets
    p = λ·uniform + (1 − λ)·softmax(α·(s − s_max)),  s in percent,
and one is drawn with numpy's `choice`. Fusion mixes in a value Q(node) ∈ [0, 1]:
    combined = (1 − w)·p + w·Q/ΣQ,
so w = 0 is AFlow's rule exactly (same draws for the same seed). UCB is the alternative:
argmax of mean + c·sqrt(ln N / (visits + 1)), fused the same way with Q.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from aflow.search.tree import Node, Tree


@dataclass(frozen=True)
class SelectionConfig:
    rule: str = "aflow"  # or "ucb"
    k: int = 4
    lam: float = 0.3
    alpha: float = 0.2
    value_weight: float = 0.0
    ucb_c: float = 1.4


def candidates(tree: Tree, k: int) -> list[Node]:
    """The root first, then the best others, k in all (AFlow's get_top_rounds)."""
    root = tree.root
    chosen = [root]
    for node in tree.ranked():
        if node is not root:
            chosen.append(node)
        if len(chosen) >= k:
            break
    return chosen


def aflow_probabilities(scores: list[float], alpha: float, lam: float) -> np.ndarray:
    """AFlow's mixed distribution over scores given in percent."""
    values = np.array(scores, dtype=np.float64)
    uniform = np.full(len(values), 1.0 / len(values))
    weights = np.exp(alpha * (values - values.max()))
    mixed = lam * uniform + (1 - lam) * weights / weights.sum()
    return mixed / mixed.sum()


def fuse(base: np.ndarray, values: list[float], weight: float) -> np.ndarray:
    if weight <= 0:
        return base
    q = np.clip(np.array(values, dtype=np.float64), 0.0, 1.0)
    q = q / q.sum() if q.sum() > 0 else np.full(len(q), 1.0 / len(q))
    combined = (1 - weight) * base + weight * q
    return combined / combined.sum()


def select(tree: Tree, config: SelectionConfig, rng: np.random.RandomState,
           value: Callable[[Node], float] | None = None) -> tuple[Node, dict]:
    """(node to expand, what the choice was based on, for the log)."""
    if config.rule == "ucb":
        return _select_ucb(tree, config, value)
    pool = sorted(candidates(tree, config.k), key=lambda n: n.mean, reverse=True)
    base = aflow_probabilities([n.mean * 100 for n in pool], config.alpha, config.lam)
    q = [value(n) for n in pool] if value and config.value_weight > 0 else []
    probabilities = fuse(base, q, config.value_weight) if q else base
    index = rng.choice(len(pool), p=probabilities)
    return pool[index], {"rule": "aflow", "candidates": [n.round for n in pool],
                         "probabilities": [round(float(p), 6) for p in probabilities], "values": q}


def _select_ucb(tree: Tree, config: SelectionConfig, value: Callable[[Node], float] | None) -> tuple[Node, dict]:
    nodes = list(tree.nodes.values())
    total = sum(n.visits for n in nodes) + 1
    ucb = [n.mean + config.ucb_c * math.sqrt(math.log(total) / (n.visits + 1)) for n in nodes]
    q = [value(n) for n in nodes] if value and config.value_weight > 0 else []
    combined = [(1 - config.value_weight) * u + config.value_weight * v for u, v in zip(ucb, q, strict=True)] if q else ucb
    index = max(range(len(nodes)), key=lambda i: (combined[i], -nodes[i].round))
    return nodes[index], {"rule": "ucb", "candidates": [n.round for n in nodes],
                          "scores": [round(c, 6) for c in combined], "values": q}
