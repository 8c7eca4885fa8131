"""Selection math, and w = 0 reproducing AFlow's rule draw for draw."""

import numpy as np
import pytest

from aflow.search.selection import SelectionConfig, aflow_probabilities, candidates, fuse, select
from aflow.search.tree import Node, Tree


def make_tree(means, visits=None):
    tree = Tree()
    for i, mean in enumerate(means, 1):
        tree.add(Node(round=i, graph="", prompt="", parent=None if i == 1 else 1, scores=[mean],
                      visits=(visits or [0] * len(means))[i - 1]))
    return tree


def aflow_reference(items, rounds_seed, draws):
    """AFlow's DataUtils.get_top_rounds(sample=4) + select_round, as written in MetaGPT,
    driven by numpy's global RNG (np.random.seed / np.random.choice)."""
    top_scores = sorted(items, key=lambda x: x["score"], reverse=True)
    unique, seen = [], set()
    first = next((i for i in top_scores if i["round"] == 1), None)
    if first:
        unique.append(first)
        seen.add(1)
    for item in top_scores:
        if item["round"] not in seen:
            unique.append(item)
            seen.add(item["round"])
            if len(unique) >= 4:
                break
    np.random.seed(rounds_seed)
    picks = []
    for _ in range(draws):
        sorted_items = sorted(unique, key=lambda x: x["score"], reverse=True)
        scores = np.array([x["score"] * 100 for x in sorted_items], dtype=np.float64)
        uniform = np.full(len(scores), 1.0 / len(scores))
        weights = np.exp(0.2 * (scores - scores.max()))
        mixed = 0.3 * uniform + 0.7 * weights / weights.sum()
        if not np.isclose(mixed.sum(), 1.0):
            mixed = mixed / mixed.sum()
        picks.append(sorted_items[np.random.choice(len(sorted_items), p=mixed)]["round"])
    return picks


def test_probabilities_by_hand():
    # scores 80, 70 (percent): softmax(0.2*(0, -10)) = (1, e^-2)/(1+e^-2)
    p = aflow_probabilities([80.0, 70.0], alpha=0.2, lam=0.3)
    soft = np.array([1.0, np.exp(-2.0)]) / (1 + np.exp(-2.0))
    assert np.allclose(p, 0.3 * 0.5 + 0.7 * soft)
    assert p.sum() == pytest.approx(1.0)
    assert np.allclose(aflow_probabilities([50.0] * 4, 0.2, 0.3), 0.25)


def test_candidates_are_root_then_best_others():
    tree = make_tree([0.1, 0.9, 0.5, 0.7, 0.8, 0.2])
    assert [n.round for n in candidates(tree, 4)] == [1, 2, 5, 4]
    assert [n.round for n in candidates(make_tree([0.9, 0.1]), 4)] == [1, 2]


@pytest.mark.parametrize("seed", [0, 1, 7, 123])
def test_zero_value_weight_reproduces_aflow_exactly(seed):
    means = [0.42, 0.61, 0.55, 0.61, 0.30, 0.58, 0.66]
    tree = make_tree(means)
    expected = aflow_reference([{"round": i, "score": m} for i, m in enumerate(means, 1)], seed, 200)
    rng = np.random.RandomState(seed)
    config = SelectionConfig(value_weight=0.0)
    got = [select(tree, config, rng, value=lambda n: 1.0 if n.round == 5 else 0.0)[0].round for _ in range(200)]
    assert got == expected
    assert len(set(got)) > 1  # the draw really is random, not a constant


def test_value_fusion_shifts_the_choice():
    tree = make_tree([0.5, 0.6, 0.55, 0.58])
    favourite = 3
    value = lambda n: 1.0 if n.round == favourite else 0.0  # noqa: E731
    counts = {w: 0 for w in (0.0, 0.9)}
    for w in counts:
        rng = np.random.RandomState(0)
        picks = [select(tree, SelectionConfig(value_weight=w), rng, value)[0].round for _ in range(400)]
        counts[w] = picks.count(favourite)
    assert counts[0.9] > 2 * counts[0.0]
    assert np.allclose(fuse(np.array([0.5, 0.5]), [1.0, 0.0], 1.0), [1.0, 0.0])
    assert np.allclose(fuse(np.array([0.2, 0.8]), [0.0, 0.0], 0.5), [0.35, 0.65])


def test_ucb_prefers_unvisited_then_values():
    tree = make_tree([0.6, 0.6, 0.6], visits=[5, 0, 5])
    node, info = select(tree, SelectionConfig(rule="ucb"), np.random.RandomState(0))
    assert node.round == 2 and info["rule"] == "ucb"
    tree = make_tree([0.9, 0.1], visits=[3, 3])
    assert select(tree, SelectionConfig(rule="ucb"), np.random.RandomState(0))[0].round == 1
    boosted = select(tree, SelectionConfig(rule="ucb", value_weight=0.9), np.random.RandomState(0),
                     value=lambda n: 1.0 if n.round == 2 else 0.0)[0]
    assert boosted.round == 2
