"""The action language as an explicit character-level DFA, for constrained decoding.

Why a DFA: to make a small policy emit only well-formed actions, a decoder masks, at each
step, the tokens whose characters would leave the language. With a finite automaton that
is a walk of each token string from the current state, cacheable per state. So the states
here are plain ints (hashable, dense: 0..len(states)-1) and few: the automaton is built as
a trie of every keyword line plus one shared chain for the quoted prompt text, then
minimised (it is acyclic, so merging states with identical acceptance and identical
successors, bottom up, gives the minimal DFA).

The prompt text is a chain of MAX_PROMPT_CHARS + 1 states, one per characters used;
`text_room(state)` says how many characters a state inside the text can still take, so
a token constraint may treat those states as one "any PROMPT_CHARS, up to n" class.

The language is exactly what `actions.parse` accepts (tests/test_canvas.py checks it);
`Grammar(kinds=...)` admits only those ADD kinds (e.g. one benchmark family's).
"""

from __future__ import annotations

from aflow.canvas.actions import VERBS
from aflow.canvas.model import KINDS, MAX_PROMPT_CHARS, MAX_ROUNDS, MAX_SAMPLES, MAX_STEPS, PROMPT_CHARS


def keyword_lines(kinds=KINDS) -> list[str]:
    """Every action line without a prompt text (the grammar's finite part)."""
    lines = []
    for kind in kinds:
        lines.append(f"ADD {kind}")
        lines += [f"ADD {kind} AFTER {n}" for n in range(MAX_STEPS + 1)]
    for n in range(1, MAX_STEPS + 1):
        lines.append(f"DELETE {n}")
        lines += [f"ENSEMBLE {n} {k}" for k in range(1, MAX_SAMPLES + 1)]
        lines += [f"ROUNDS {n} {r}" for r in range(1, MAX_ROUNDS + 1)]
    lines.append("FINISH")
    assert {line.split(" ")[0] for line in lines} | {"SET_PROMPT"} == set(VERBS)
    return lines


class Grammar:
    """start() -> state; step(state, char) -> state or None (no action continues so);
    accepting(state) -> a complete action. States are ints."""

    def __init__(self, kinds=KINDS):
        self.kinds = tuple(k for k in KINDS if k in set(kinds))
        transitions, accepting, room = _build(self.kinds)
        self._transitions = transitions  # state -> {char: state}
        self._accepting = accepting
        self._room = room

    @property
    def states(self) -> range:
        return range(len(self._transitions))

    @property
    def alphabet(self) -> frozenset[str]:
        return frozenset(c for row in self._transitions for c in row)

    def start(self) -> int:
        return 0

    def step(self, state: int, char: str) -> int | None:
        return self._transitions[state].get(char)

    def accepting(self, state: int) -> bool:
        return state in self._accepting

    def allowed(self, state: int) -> dict[str, int]:
        """The characters that continue from `state`, with their next states."""
        return dict(self._transitions[state])

    def text_room(self, state: int) -> int | None:
        """Inside a prompt text: how many more text characters fit; otherwise None."""
        return self._room.get(state)

    def walk(self, text: str, state: int | None = None) -> int | None:
        """The state after reading `text` from `state` (start by default), or None."""
        state = self.start() if state is None else state
        for char in text:
            state = self._transitions[state].get(char)
            if state is None:
                return None
        return state

    def accepts(self, text: str) -> bool:
        state = self.walk(text) if isinstance(text, str) else None
        return state is not None and self.accepting(state)


def _build(kinds) -> tuple[list[dict[str, int]], frozenset[int], dict[int, int]]:
    trans: list[dict[str, int]] = []
    final: set[int] = set()

    def new() -> int:
        trans.append({})
        return len(trans) - 1

    start = new()
    newline = new()  # after the optional trailing newline: nothing more
    final.add(newline)

    def path(text: str) -> int:
        state = start
        for char in text:
            state = trans[state].get(char) if char in trans[state] else trans[state].setdefault(char, new())
        return state

    def finish(state: int) -> None:
        final.add(state)
        trans[state]["\n"] = newline

    for line in keyword_lines(kinds):
        finish(path(line))
    # the quoted prompt text: chain[i] has read i text characters
    closed = new()
    finish(closed)
    chain = [new() for _ in range(MAX_PROMPT_CHARS + 1)]
    for i, state in enumerate(chain):
        trans[state]['"'] = closed
        if i < MAX_PROMPT_CHARS:
            for char in PROMPT_CHARS:
                trans[state][char] = chain[i + 1]
    for n in range(1, MAX_STEPS + 1):
        trans[path(f"SET_PROMPT {n} ")]['"'] = chain[0]
    return _minimise(trans, final, start, {s: MAX_PROMPT_CHARS - i for i, s in enumerate(chain)})


def _minimise(trans, final, start, room):
    """Merge equivalent states of an acyclic DFA; renumber them breadth-first from start (0)."""
    ids: dict[tuple, int] = {}
    canon: dict[int, int] = {}

    order = _post_order(trans, start)
    for state in order:  # successors before predecessors
        key = (state in final, tuple(sorted((c, canon[t]) for c, t in trans[state].items())))
        canon[state] = ids.setdefault(key, len(ids))
    merged: dict[int, dict[str, int]] = {}
    for state in order:
        merged.setdefault(canon[state], {c: canon[t] for c, t in trans[state].items()})
    numbering = {canon[start]: 0}
    queue = [canon[start]]
    for state in queue:
        for char in sorted(merged[state]):
            target = merged[state][char]
            if target not in numbering:
                numbering[target] = len(numbering)
                queue.append(target)
    table: list[dict[str, int]] = [{} for _ in numbering]
    for old, new_id in numbering.items():
        table[new_id] = {c: numbering[t] for c, t in merged[old].items()}
    accepting = frozenset(numbering[canon[s]] for s in final)
    rooms = {numbering[canon[s]]: r for s, r in room.items()}
    return table, accepting, rooms


def _post_order(trans, start) -> list[int]:
    seen, order, stack = {start}, [], [(start, iter(sorted(trans[start].values())))]
    while stack:
        state, children = stack[-1]
        for child in children:
            if child not in seen:
                seen.add(child)
                stack.append((child, iter(sorted(trans[child].values()))))
                break
        else:
            stack.pop()
            order.append(state)
    return order
