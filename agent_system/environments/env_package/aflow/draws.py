"""Which problems score a task-mode step, and which ones the policy may see.

A split is cut once, by a seeded shuffle, into a small *feedback* set and a *scoring pool*:

* the feedback problems are the only ones whose text ever reaches the policy (the failures in
  the observation come from them), and they never score anything;
* each step is scored on a fresh sample of the pool, drawn from (seed, uid, turn): the n rollouts
  of a GRPO group meet the same problems at the same turn, and the workflow a step starts from is
  scored on the same sample as the proposal (a paired difference: the problems' difficulty cancels).

So a workflow that special-cases the problems it was shown earns nothing, and a lucky draw is
not frozen into a node's score: every later step from a node measures it again on new problems.
"""

from __future__ import annotations

import hashlib
import random

from aflow.benchmarks import Problem


class Draws:
    def __init__(self, problems: list[Problem], sample_size: int, feedback_size: int, seed: int):
        if len(problems) < 2:
            raise ValueError(f"a task-mode split needs at least 2 problems (feedback and scoring), not {len(problems)}")
        order = list(problems)
        random.Random(seed).shuffle(order)
        cut = max(1, min(feedback_size, len(order) // 2))
        self.feedback, self.pool = order[:cut], order[cut:]
        self.sample_size = max(1, min(sample_size, len(self.pool)))
        self.seed = seed

    def sample(self, uid: str, turn: int) -> list[Problem]:
        key = hashlib.sha256(f"{self.seed}/{uid}/{turn}".encode()).hexdigest()
        return random.Random(int(key, 16)).sample(self.pool, self.sample_size)

