"""What building the canvas grammar's token constraint costs over SmolLM2's vocabulary.

    python -m bench.token_constraint [--grammar canvas-answer] [--repeat R]

The exact time that tests/test_constrained.py no longer asserts (there, a generous bound on
CPU time, which a busy machine does not inflate). Loads the policy's tokenizer (as the CPU
rollout does), then builds `TokenConstraint` R times from scratch. Printed: grammar states,
vocabulary size, wall seconds per build (mean and the fastest; ~1-2 s on 2 cores), CPU
seconds per build (mean), and for comparison the seconds a naive build would need (walking
every token from every state, timed on 3 states).

Output is one ``name: value`` per line.
"""

from __future__ import annotations

import argparse
import statistics
import time


def emit(name: str, value) -> None:
    if isinstance(value, float):
        value = f"{value:.4f}"
    print(f"{name}: {value}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grammar", default="canvas-answer")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    from agent_system.constrained import TokenConstraint, grammar
    from agent_system.policy_model import load_policy

    _, tokenizer = load_policy(None)
    rules = grammar(args.grammar)
    walls, cpus = [], []
    for _ in range(args.repeat):
        wall, cpu = time.perf_counter(), time.process_time()
        constraint = TokenConstraint(tokenizer, rules)
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    states = list(rules.states)
    began = time.perf_counter()
    for state in states[:3]:
        [text is not None and rules.walk(text, state) is not None for text in constraint._strings]
    naive = (time.perf_counter() - began) / 3 * len(states)
    emit("grammar_states", len(states))
    emit("vocab_size", constraint.vocab_size)
    emit("build_seconds_mean", statistics.mean(walls))
    emit("build_seconds_min", min(walls))
    emit("build_cpu_seconds_mean", statistics.mean(cpus))
    emit("naive_build_seconds_estimate", naive)


if __name__ == "__main__":
    main()
