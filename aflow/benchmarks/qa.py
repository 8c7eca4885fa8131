"""Scoring of the QA benchmarks (HotpotQA, DROP): SQuAD token F1, and a stricter rule for rewards.

`aflow` scoring is AFlow's: the best token F1 over the reference answers (SQuAD
normalization). As a reward, F1 pays for answers that do not choose anything: "A B" for an
"A or B?" question scores 0.67 whatever the truth is, "yes no" 0.67 on every yes/no question,
and an answer assembled from the question's own words (its names and numbers) shares words
with most references. An honest wrong answer scores 0. A policy trained on that learns to hedge.

`reward` scoring, in order:

1. an answer equal to a reference after normalization scores 1.0 (every gold answer keeps
   full marks, "AC/DC" included);
2. the hedge gate (`hedge`) scores 0, with a short reason that never quotes a reference, an
   answer that says both "yes" and "no"; offers alternatives ("or", "either", "|", "/", ";",
   a line break); names more than one of an "X or Y" question's alternatives; carries more
   numbers absent from the question than the longest reference has (a spray of candidate
   numbers); or is stuffed (more content words found in neither the question nor a reference
   than one stray word plus one per four reference tokens, or longer than max(2R, R + 12)
   tokens, R the longest reference);
3. otherwise the **answer-token F1** (`answer_f1`): token F1 counting only the tokens that are
   not in the question, on both sides. Words taken from the question are not evidence of an
   answer, so they earn nothing: an answer built from the question's words scores 0, and so
   does any answer that names the options of a comparison, however it is phrased ("Which of X
   and Y", "Between X and Y", "X vs Y", "X or Y"). Where a reference is made of the question's
   words only (a choice between options it names), nothing is left to share: such questions
   pay exact match only, the rule of verl's own QA reward (verl/utils/reward_score/qa_em.py).

What it keeps: an exact answer, however cased, punctuated or with "the", scores 1.0; an honest
near miss keeps partial credit for the answer words it gets right ("new york city" for "new
york": 0.8), and a one-sentence answer that restates the question around the answer is paid for
its answer words only ("The Yamethin rebellion lasted 20 years" for "20": 0.67). What it costs:
an honest near miss on a choice question ("those 65 years of age or older" for "65 years of age
or older") scores 0, as under exact match, and so does a paraphrase whose words are all in the
question. It cannot be manufactured from the question: the credit comes only from words the
question does not contain, and the gate bounds how many of those an answer may carry.

The RL environment's optional LLM judge may lift a lexical score that misses a paraphrase, but
the gate comes after it and is final (Episode._judged in agent_system).
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Iterable

_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD normalization: lower case, no punctuation, no articles, single spaces."""
    text = str(text).lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def f1(prediction: str, truth: str) -> float:
    """Token F1 as AFlow computes it: 0 without a common token (two empty answers included)."""
    pred, gold = normalize_answer(prediction).split(), normalize_answer(truth).split()
    same = sum((Counter(pred) & Counter(gold)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(gold)
    return 2 * precision * recall / (precision + recall)


def answer_f1(prediction: str, answers: list[str], question: str) -> float:
    """The best token F1 over the references, counting only tokens absent from the question (both
    sides); 0 for a reference made of the question's words alone (exact match pays those)."""
    asked = set(_tokens(question))
    mine = [t for t in _tokens(prediction) if t not in asked]
    best = 0.0
    for answer in answers:
        theirs = [t for t in _tokens(answer) if t not in asked]
        same = sum((Counter(mine) & Counter(theirs)).values())
        if theirs and same:
            precision, recall = same / len(mine), same / len(theirs)
            best = max(best, 2 * precision * recall / (precision + recall))
    return best


def max_f1(prediction: str, answers: list[str], split_parts: bool = False) -> float:
    """The best F1 over the non-empty references; with `split_parts` (AFlow's DROP rule), also
    over the prediction's `|`-separated parts, so the best part counts."""
    parts = prediction.split("|") if split_parts else [prediction]
    return max((f1(part, answer) for answer in answers if answer.strip() for part in parts), default=0.0)


# ---- the hedge gate -----------------------------------------------------------------

# Forms that offer a choice instead of an answer, looked for in the raw text (normalization
# deletes "|" and "/" and would glue "A/B" into one token).
ALTERNATIVE_MARKERS: dict[str, re.Pattern] = {
    "or": re.compile(r"\bor\b", re.IGNORECASE),
    "either": re.compile(r"\beither\b", re.IGNORECASE),
    "|": re.compile(r"\|"),
    "/": re.compile(r"/"),
    ";": re.compile(r";"),
    "line break": re.compile(r"\S[ \t]*\r?\n\s*\S"),
}

# Function words: never evidence of stuffing, never the word that identifies an alternative.
STOPWORDS = frozenset("""
a an the of to in on at for by with from as into onto than then and or nor but if so
is was are were be been being am do does did done has have had having will would can could
shall should may might must it its this that these those there here which who whom whose
what when where why how whether either neither both not no yes he she his her him they them
their theirs we our you your i me my one ones same other such also only just very about
after before over under during between while
""".split())

# Words a question opens with: a comma-separated piece that starts with one is the question's
# lead-in ("Which came first, A, B, or C"), not an alternative.
_LEAD_WORDS = frozenset("""
which who whom whose what when where why how is was are were do does did has have had can
could will would should in on at during after before according
""".split())

# Stuffing thresholds (see the module docstring): stray content words allowed beyond the
# question and the references, and the length cap as (factor, slack) over the longest reference.
STRAY_WORDS = 1
STRAY_WORDS_PER_REFERENCE_TOKENS = 4
LENGTH_FACTOR, LENGTH_SLACK = 2, 12


def question_of(problem_text: str) -> str:
    """The question of a QA problem: the text after the last "Question:" (both HotpotQA's and
    DROP's inputs end "Question: ...\\nAnswer:"), without that "Answer:"; with no such label,
    the last non-empty line, so the alternatives of a passage are never taken for the question's."""
    text = str(problem_text)
    start = text.rfind("Question:")
    if start >= 0:
        text = text[start + len("Question:"):]
        end = text.rfind("Answer:")
        return (text[:end] if end >= 0 else text).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip() and line.strip() != "Answer:"]
    return lines[-1] if lines else ""


def _tokens(text: str) -> list[str]:
    return normalize_answer(text).split()


def alternatives(question: str) -> list[str]:
    """One identifying word per explicit alternative of an "X or Y [or Z]" question.

    The alternatives are the pieces next to each "or" of a clause, plus the comma-separated
    pieces of a list before the first one ("A, B, or C"). Where the left piece has no comma
    before it, it carries the question's lead-in ("Is Alice older" or "younger than Bob"),
    so each alternative is identified by one word at its edge near the "or" that appears in
    no other alternative and is not a function word: the last such word of the first
    alternative, the first of the others ("older", "younger"). A word, not the whole
    phrase, because a hedge names alternatives in any form ("older younger"). "not" may
    identify one ("To SquarePants or Not to SquarePants"); a bare "... or not?" is no
    alternative. Fewer than two identifiable alternatives give none."""
    pieces: list[list[str]] = []
    for clause in re.split(r"[?!:;\n]", str(question)):
        if not ALTERNATIVE_MARKERS["or"].search(clause):
            continue
        clause = re.sub(r",\s*(or)\b", r" \1", clause, flags=re.IGNORECASE)
        parts = re.split(r"(\bor\b|,(?!\d))", clause, flags=re.IGNORECASE)  # not the comma of "3,826"
        texts, seps = parts[0::2], [s.lower() for s in parts[1::2]]
        chosen = set()
        for k, sep in enumerate(seps):
            if sep == "or":
                chosen |= {k, k + 1}
        # "either A, B or C", "whether A or B": the alternatives start after the word
        texts = [re.split(r"\b(?:either|whether)\b", t, flags=re.IGNORECASE)[-1] for t in texts]
        k = seps.index("or") - 1
        while k >= 0 and seps[k] == ",":
            words = _tokens(texts[k])
            if not words or words[0] in _LEAD_WORDS or len(words) > 6:
                break
            chosen.add(k)
            k -= 1
        pieces += [_tokens(texts[i]) for i in sorted(chosen)]
    pieces = [p for p in pieces if p and p not in (["not"], ["no"])]  # "... or not?" is a yes/no question
    cores = []
    for i, piece in enumerate(pieces):
        others = {w for j, p in enumerate(pieces) if j != i for w in p}
        distinct = [w for w in piece if w not in others and (w == "not" or w not in STOPWORDS)]
        if distinct:
            cores.append(distinct[-1] if i == 0 else distinct[0])
    return cores if len(set(cores)) >= 2 else []


def _named(words: Iterable[str], cores: list[str]) -> int:
    present = set(words)
    return sum(core in present for core in set(cores))


def _is_number(word: str) -> bool:
    return any(ch.isdigit() for ch in word)


def _stem(word: str) -> str:
    """Crude stem so a restatement's "lasted" matches the question's "last"; numbers stay exact."""
    return word if any(ch.isdigit() for ch in word) else word[:4]


def _or_copied(words: list[str], question: list[str]) -> bool:
    """Every "or" of the answer sits between the same two words as an "or" of the question:
    the answer quotes a phrase of the question rather than joining alternatives of its own."""
    trigrams = {tuple(question[i - 1:i + 2]) for i, w in enumerate(question) if w == "or" and 0 < i < len(question) - 1}
    return all(0 < i < len(words) - 1 and tuple(words[i - 1:i + 2]) in trigrams
               for i, w in enumerate(words) if w == "or")


def hedge(answer: str, references: list[str], question: str = "") -> str | None:
    """Why `answer` hedges or is stuffed (a short reason without any reference text), or None.

    Every test compares with what the references themselves do, so no reference trips it."""
    answer = str(answer)
    words = _tokens(answer)
    refs = [str(r) for r in references if normalize_answer(r)] or [str(r) for r in references]
    ref_words = [_tokens(r) for r in refs]
    if not words:
        return None
    if {"yes", "no"} <= set(words) and not any({"yes", "no"} <= set(r) for r in ref_words):
        return "hedged: answers both yes and no"
    cores = alternatives(question)
    for label, pattern in ALTERNATIVE_MARKERS.items():
        if not pattern.search(answer.strip()) or any(pattern.search(r) for r in refs):
            continue
        if label == "or" and cores and _or_copied(words, _tokens(question)):
            continue  # e.g. "65 years of age or older" quoted from the question: judged by its alternatives
        return f"hedged: offers alternatives ({label})"
    if cores:
        named = _named(words, cores)
        if named >= 2 and named > max((_named(r, cores) for r in ref_words), default=0):
            return "hedged: names more than one of the question's alternatives"
    asked = set(_tokens(question))
    numbers = sum(1 for w in words if _is_number(w) and w not in asked)
    if numbers > max((sum(1 for w in r if _is_number(w)) for r in ref_words), default=0):
        return "hedged: offers more numbers than an answer has"
    longest = max((len(r) for r in ref_words), default=0)
    known = {_stem(w) for w in _tokens(question)} | {_stem(w) for r in ref_words for w in r}
    stray = sum(1 for w in words if w not in STOPWORDS and _stem(w) not in known)
    if stray > STRAY_WORDS + longest // STRAY_WORDS_PER_REFERENCE_TOKENS:
        return "stuffed: too many words beyond the question and the answer"
    if len(words) > max(LENGTH_FACTOR * longest, longest + LENGTH_SLACK):
        return "stuffed: far longer than the expected answer"
    return None


def gate(problem, output) -> str | None:
    """`hedge` for a QA problem (a `Problem` of hotpotqa or drop) and a workflow's output; an
    output equal to a reference after normalization is the answer, never a hedge ("AC/DC")."""
    references = list(problem.reference.get("answers", []))
    if normalize_answer(output) in {normalize_answer(r) for r in references}:
        return None
    return hedge(str(output), references, question_of(problem.inputs.get("problem", "")))


def score(problem, output, scoring: str = "aflow", split_parts: bool = False) -> tuple[float, str | None]:
    """(score, reason) of a QA output under a scoring variant (see the module docstring).
    `split_parts` is DROP's best-part-of-`|` rule, AFlow's only: as a reward it is hedging."""
    answers = list(problem.reference.get("answers", []))
    if scoring == "reward":
        if normalize_answer(output) in {normalize_answer(r) for r in answers if normalize_answer(r)}:
            return 1.0, None
        reason = gate(problem, output)
        if reason is not None:
            return 0.0, reason
        return answer_f1(str(output), answers, question_of(problem.inputs.get("problem", ""))), None
    return max_f1(str(output), answers, split_parts), None
