"""Decoding that always parses: the canvas action grammar lifted from characters to a tokenizer's tokens.

Why: with the canvas action space (`aflow.canvas`) a turn is one line of a finite language, and a 135M policy
wastes most of its early episodes on lines that do not parse. Masking, at each decoding step, every token
whose characters would leave the language makes an unparseable action impossible. For RL the masking must
be part of the policy: the rollout reports log-probs under the masked (renormalised) distribution it drew
from, and the trainer recomputes the same quantity, log π_c(t) = log π(t) − log Σ_{a allowed} π(a)
(`log_allowed_mass`), so the importance ratios compare like with like.

`TokenConstraint` is the character DFA (`aflow.canvas.Grammar`) walked over each token's string:

* a token's string is its id decoded alone (no clean-up of spaces); a string with any character outside
  the grammar's alphabet (non-ASCII, a partial UTF-8 byte, ...) never matches, and neither does any special
  or added token (e.g. "<reponame>", whose characters would all be legal prompt text);
* the EOS ids (the tokenizer's `eos_token_id`: the same on the rollout and the trainer side, which matters
  because the allowed set is the normaliser) are allowed exactly in accepting states, and end the action
  (`advance` returns `END`); after the optional trailing newline only EOS is left;
* masks are computed once per state when the constraint is built. Keyword states walk only the tokens
  whose first two characters the DFA admits from there; the ~200 states inside the quoted prompt text use
  `Grammar.text_room`: any token made only of prompt characters fits when it is no longer than the room
  left, so only the few tokens with a quote or newline are walked. Building it for SmolLM2's 49k vocabulary
  takes about a second; `token_constraint` caches it per (tokenizer, grammar name, vocabulary size).

Grammar names (`GRAMMARS`): "canvas-answer" and "canvas-code", the ADD kinds of each benchmark family
(`aflow.canvas.kinds_for`).
"""

from __future__ import annotations

import functools
import threading

import torch

from aflow.canvas import Grammar, kinds_for
from aflow.canvas.model import PROMPT_CHARS

GRAMMARS = {"canvas-answer": False, "canvas-code": True}
"""Grammar name -> the `code` flag of the benchmark family whose ADD kinds it admits."""


def grammar_name(code: bool) -> str:
    """The grammar of a benchmark family (`get_benchmark(name).is_code`)."""
    return "canvas-code" if code else "canvas-answer"


@functools.cache
def grammar(name: str) -> Grammar:
    if name not in GRAMMARS:
        raise ValueError(f"unknown grammar {name!r} (known: {', '.join(GRAMMARS)})")
    return Grammar(kinds_for(GRAMMARS[name]))


class TokenConstraint:
    """The grammar over token ids. States are the grammar's ints; `END` follows an EOS."""

    END = -2

    def __init__(self, tokenizer, grammar: Grammar, vocab_size: int | None = None, eos_ids=None):
        self.grammar = grammar
        self.vocab_size = int(vocab_size if vocab_size is not None else len(tokenizer))
        if eos_ids is None:
            eos_ids = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
        self.eos_ids = frozenset(int(t) for t in eos_ids)
        self._strings = _token_strings(tokenizer, grammar.alphabet, self.vocab_size)
        self.start = grammar.start()
        self._masks = self._build_masks()

    # ------------------------------------------------------------------ the API

    def allowed(self, state: int) -> torch.Tensor:
        """BoolTensor[vocab_size]: the tokens that may follow `state` (nothing after END)."""
        if state == self.END:
            return torch.zeros(self.vocab_size, dtype=torch.bool)
        return self._masks[state]

    def advance(self, state: int, token_id: int) -> int | None:
        """The state after `token_id`, `END` after an allowed EOS, None when the token is not allowed."""
        token_id = int(token_id)
        if state == self.END:
            return None
        if token_id in self.eos_ids:
            return self.END if self.grammar.accepting(state) else None
        text = self._strings[token_id] if 0 <= token_id < self.vocab_size else None
        return None if text is None else self.grammar.walk(text, state)

    def states(self, token_ids, state: int | None = None) -> list[int]:
        """The state before each token (for recomputing the masks on the trainer side); raises on a token
        the constraint does not allow, since such a sequence was not sampled under it."""
        state = self.start if state is None else state
        before = []
        for token_id in token_ids:
            before.append(state)
            state = self.advance(state, token_id)
            if state is None:
                raise ValueError(f"token {int(token_id)} is not allowed after {len(before) - 1} tokens")
        return before

    def text(self, token_ids) -> str:
        """The characters the DFA walked: the per-token strings concatenated (EOS adds nothing). The action
        text to send the environment, rather than a `decode` that may clean up spaces."""
        parts = []
        for token_id in token_ids:
            token_id = int(token_id)
            if token_id in self.eos_ids:
                break
            text = self._strings[token_id] if 0 <= token_id < self.vocab_size else None
            if text is None:
                raise ValueError(f"token {token_id} is not part of the grammar's vocabulary")
            parts.append(text)
        return "".join(parts)

    def masks(self, states: torch.Tensor) -> torch.Tensor:
        """BoolTensor[len(states), vocab_size], one `allowed` row per state (all states >= 0)."""
        return self._stacked[states.to(torch.long).cpu()]

    # ------------------------------------------------------------------ building

    def _build_masks(self) -> list[torch.Tensor]:
        g, strings = self.grammar, self._strings
        singles: dict[str, list[int]] = {}
        pairs: dict[str, list[int]] = {}
        pure_len = torch.full((self.vocab_size,), 1 << 30, dtype=torch.long)  # tokens of prompt characters only
        other: dict[tuple[int, str], list[int]] = {}  # tokens with a non-prompt character, by (prefix length, rest)
        for token_id, text in enumerate(strings):
            if text is None:
                continue
            (singles if len(text) == 1 else pairs).setdefault(text[:2], []).append(token_id)
            cut = next((i for i, c in enumerate(text) if c not in PROMPT_CHARS), None)
            if cut is None:
                pure_len[token_id] = len(text)
            else:
                other.setdefault((cut, text[cut:]), []).append(token_id)
        eos = sorted(i for i in self.eos_ids if i < self.vocab_size)
        stacked = torch.zeros(len(g.states), self.vocab_size, dtype=torch.bool)
        text_states = [s for s in g.states if g.text_room(s) is not None]
        if text_states:
            rooms = torch.tensor([g.text_room(s) for s in text_states], dtype=torch.long)
            stacked[torch.tensor(text_states)] = pure_len.unsqueeze(0) <= rooms.unsqueeze(1)
        rows: list[int] = []
        cols: list[int] = []
        for state in g.states:
            room = g.text_room(state)
            if room is not None:
                # text_room's contract: prompt characters move a text state as a class, so one token per
                # (prefix length, rest) group stands for its whole group
                hits = [t for (cut, rest), group in other.items()
                        if cut <= room and g.walk(strings[group[0]], state) is not None for t in group]
            else:
                candidates = []
                for c1, s1 in g.allowed(state).items():
                    candidates += singles.get(c1, ())
                    for c2 in g.allowed(s1):
                        candidates += pairs.get(c1 + c2, ())
                hits = [t for t in candidates if g.walk(strings[t], state) is not None]
            if g.accepting(state):
                hits += eos
            rows += [state] * len(hits)
            cols += hits
        stacked[torch.tensor(rows, dtype=torch.long), torch.tensor(cols, dtype=torch.long)] = True
        empty = (~stacked.any(dim=1)).nonzero().flatten().tolist()
        if empty:
            raise ValueError(f"no token of this vocabulary continues grammar state(s) {empty[:5]}")
        self._stacked = stacked
        return list(stacked)


def _token_strings(tokenizer, alphabet: frozenset[str], vocab_size: int) -> list[str | None]:
    """Each id decoded alone, or None when it can never be part of an action."""
    count = min(len(tokenizer), vocab_size)
    texts = tokenizer.batch_decode([[i] for i in range(count)], skip_special_tokens=False,
                                   clean_up_tokenization_spaces=False)
    special = set(getattr(tokenizer, "all_special_ids", ()) or ())
    special |= set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    strings: list[str | None] = [None] * vocab_size
    for token_id, text in enumerate(texts):
        if text and token_id not in special and all(c in alphabet for c in text):
            strings[token_id] = text
    return strings


_CACHE: dict[tuple, tuple[object, TokenConstraint]] = {}
_CACHE_LOCK = threading.Lock()


def token_constraint(tokenizer, name: str, vocab_size: int | None = None) -> TokenConstraint:
    """The constraint for grammar `name` over `tokenizer`, built once (the cache holds the tokenizer, so its
    id is never reused by another while the entry lives)."""
    vocab_size = int(vocab_size if vocab_size is not None else len(tokenizer))
    key = (id(tokenizer), name, vocab_size)
    with _CACHE_LOCK:
        hit = _CACHE.get(key)
        if hit is None:
            hit = _CACHE[key] = (tokenizer, TokenConstraint(tokenizer, grammar(name), vocab_size))
    return hit[1]


# ---------------------------------------------------------------------- the trainer's side


def log_allowed_mass(logits: torch.Tensor, states: torch.Tensor, constraint: TokenConstraint) -> torch.Tensor:
    """log Σ_{a allowed(state)} softmax(logits)_a per row; 0 where state < 0 (unconstrained).

    logits: [N, V], already divided by the temperature (as the sampler and verl's actor do). Subtracting
    this from log_softmax(logits)[token] gives the token's log-prob under the constrained distribution.
    Differentiable in `logits`. Computed in float32, returned in float32."""
    states = torch.as_tensor(states, dtype=torch.long, device=logits.device)
    out = torch.zeros(states.shape[0], dtype=torch.float32, device=logits.device)
    rows = (states >= 0).nonzero().squeeze(-1)
    if rows.numel() == 0:
        return out
    selected = logits[rows].float()
    masks = constraint.masks(states[rows]).to(logits.device)
    vocab = selected.shape[-1]
    if masks.shape[-1] < vocab:  # logits wider than the constraint (padded embeddings): never allowed
        masks = torch.nn.functional.pad(masks, (0, vocab - masks.shape[-1]), value=False)
    masks = masks[:, :vocab]
    allowed = torch.logsumexp(selected.masked_fill(~masks, -torch.inf), dim=-1)
    return out.index_put((rows,), allowed - torch.logsumexp(selected, dim=-1))

