"""Parity pairs: (benchmark output, the score AFlow's own code gives it), built from the data splits.

    python -m tests.parity_set --data-dir DIR [--out pairs.jsonl] [--per-benchmark N]

For every benchmark, realistic output formats of the reference answer, near misses and wrong
answers. The expected score of each pair is derived from AFlow's code (FoundationAgents/AFlow,
`benchmarks/*.py` and `scripts/utils/sanitize.py`), written here as the rule of each format
rather than by calling any scorer of this project:

* GSM8K: the last number of the text (commas dropped) within 1e-6 of the reference's.
* MATH: the content of the last `\\boxed{}` whose braces nest at most one level deep, else the
  last sentence; equal when the strings are equal, or both are numbers (`%` read as /100) within
  1e-3, or both parse as plain expressions (AFlow's pinned environment has no antlr4, so its
  `parse_latex` always fails and only sympy's `parse_expr` reads text) that simplify to equal.
* HotpotQA: SQuAD token F1 against the answer. DROP: the best F1 over the prediction's
  `|`-separated parts and the non-empty reference alternatives.
* HumanEval, MBPP: the answer sanitised (longest parsing run of lines, imports and what the
  entry point reaches), run with math, hashlib, re and typing's names preloaded; the reference
  passes.

A pair whose expected score is one AFlow's own defect produces carries `defect` (the name of
the documented fix, README "Scoring") and `project`, the score this project gives instead.
`tests/test_parity.py` asserts the project's `aflow` scoring gives every pair its score.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import string
from pathlib import Path

from aflow.benchmarks import get_benchmark

JUNK = ["zxqvw", "qwzyx", "vvkrt", "plmqz"]  # tokens no reference contains


def _pair(benchmark, problem, fmt, prediction, expected, defect=None, project=None) -> dict:
    row = {"benchmark": benchmark, "id": problem.id, "format": fmt, "prediction": prediction, "expected": expected}
    if defect:
        row.update(defect=defect, project=project)
    return row


def _number(text: str) -> float:
    return float(str(text).replace(",", ""))


def _shown(x: float) -> str:
    return f"{int(x)}" if x == int(x) else repr(x)


def gsm8k_pairs(problem) -> list[dict]:
    answer = _number(problem.reference["answer"])
    shown = _shown(answer)
    pairs = [
        ("bare", shown, 1.0),
        ("sentence", f"The answer is {shown}.", 1.0),
        ("hashes", f"Let me compute step by step.\n#### {shown}", 1.0),
        ("boxed", f"So the final answer is $\\boxed{{{shown}}}$", 1.0),
        ("with unit", f"She needs {shown} dollars in total.", 1.0),
        ("dollar sign", f"${shown}", 1.0),
        ("trailing zero", f"{shown}.0" if answer == int(answer) else f"{shown}0", 1.0),
        ("check after the answer", f"The answer is {shown}. Check: 2 + 2 = 4", 1.0 if answer == 4 else 0.0),
        ("off by one", f"The answer is {_shown(answer + 1)}.", 0.0),
        ("right number first, wrong last", f"First {shown}, then {_shown(answer + 10)}.", 0.0),
        ("no number", "I cannot tell from the question.", 0.0),
    ]
    if abs(answer) >= 1000 and answer == int(answer):
        pairs.append(("thousands separator", f"The total is {int(answer):,}.", 1.0))
    return [_pair("gsm8k", problem, *p) for p in pairs]


# MATH, AFlow's rule written out (benchmarks/math.py): the answer of a text, and its number.
_AFLOW_BOXED = re.compile(r"\\boxed{((?:[^{}]|{[^{}]*})*)}", re.DOTALL)


def _aflow_math_answer(text: str) -> str:
    boxed = _AFLOW_BOXED.findall(text)
    if boxed:
        return boxed[-1].strip()
    sentences = [s.strip() for s in re.split(r"(?<!\d)[.!?]\s+", text) if s.strip()]
    return sentences[-1] if sentences else ""


def _aflow_digits(text: str) -> float | None:
    text = text.replace(",", "")
    try:
        return float(text)
    except ValueError:
        if text.endswith("%"):
            try:
                return float(text[:-1].removesuffix("\\")) / 100
            except ValueError:
                pass
    return None


def _fixed_answer(text: str) -> str:
    """AFlow's extraction with its defects fixed: the last \\boxed{...} or \\fbox{...} read with
    balanced braces at any depth, else the last sentence."""
    found, at = None, 0
    for match in re.finditer(r"\\(?:boxed|fbox)\{", text):
        if match.start() < at:
            continue
        depth = 0
        for i in range(match.end() - 1, len(text)):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                found, at = text[match.end() : i].strip(), i + 1
                break
    if found is not None:
        return found
    sentences = [s.strip() for s in re.split(r"(?<!\d)[.!?]\s+", text) if s.strip()]
    return sentences[-1] if sentences else ""


def _math_equal(answer: str, reference: str) -> float:
    """Equal strings, or both numbers within 1e-3. The formats below never put a text against
    a different text that sympy's plain-expression parser reads as the same value (LaTeX and
    prose do not parse; a changed digit or an added unit changes the value), where AFlow
    would also score 1."""
    if answer == reference:
        return 1.0
    a, b = _aflow_digits(answer), _aflow_digits(reference)
    return 1.0 if a is not None and b is not None and math.isclose(a, b, abs_tol=1e-3) else 0.0


def math_pairs(problem) -> list[dict]:
    """Formats of the reference answer ANS (its last \\boxed{}, braces balanced). A pair AFlow
    scores differently only because it cannot read \\fbox, or a \\boxed{} nested deeper than one
    level (then it compares the last sentences of the texts), carries that defect."""
    solution = problem.reference["solution"]
    answer = _fixed_answer(solution)
    rows = []

    def add(fmt: str, prediction: str) -> None:
        expected = _math_equal(_aflow_math_answer(prediction), _aflow_math_answer(solution))
        project = _math_equal(_fixed_answer(prediction), answer)
        defect = None if project == expected else "fbox" if "\\fbox" in prediction else "boxed-nesting"
        rows.append(_pair("math", problem, fmt, prediction, expected, defect, project))

    add("full solution", solution)
    add("boxed alone", f"\\boxed{{{answer}}}")
    add("sentence, boxed", f"The answer is $\\boxed{{{answer}}}$.")
    add("boxed, then a check", f"So the answer is $\\boxed{{{answer}}}$. This can be checked by substitution.")
    add("boxed with spaces", f"\\boxed{{ {answer} }}")
    add("fbox", f"\\fbox{{{answer}}}")
    add("dollars, end of sentence", f"The answer is ${answer}$.")
    add("final answer, unboxed", f"The final answer is {answer}")
    add("bare", answer)
    add("unit in the box", f"\\boxed{{{answer} \\text{{ cm}}}}")
    add("percent in the box", f"\\boxed{{{answer}\\%}}")
    if "\\frac" in answer:
        dfrac = answer.replace("\\frac", "\\dfrac")
        add("dfrac for frac", f"\\boxed{{{dfrac}}}")
    fraction = re.fullmatch(r"(-?)\\frac\{(\d+)\}\{(\d+)\}", answer)
    if fraction:  # plain text parses, LaTeX does not (no antlr4): never equal to the reference
        sign, num, den = fraction.groups()
        add("plain fraction", f"\\boxed{{{sign}{num}/{den}}}")
        add("decimal for a fraction", f"\\boxed{{{int(sign + num) / int(den):.6g}}}")
    if re.fullmatch(r"-?\d+", answer):
        add("trailing .0", f"\\boxed{{{answer}.0}}")
        if abs(int(answer)) >= 1000:
            add("thousands separator", f"\\boxed{{{int(answer):,}}}")
    digits = [m.start() for m in re.finditer(r"\d", answer)]
    if digits:  # the last digit changed
        near = answer[: digits[-1]] + str((int(answer[digits[-1]]) + 1) % 10) + answer[digits[-1] + 1 :]
        add("near miss", f"The answer is $\\boxed{{{near}}}$.")
    add("wrong", f"After simplifying, the answer is $\\boxed{{{JUNK[0]}}}$.")
    add("no answer", "I could not solve this problem.")
    return rows


def _tokens(text: str) -> list[str]:
    text = "".join(ch for ch in text.lower() if ch not in string.punctuation)
    return re.sub(r"\b(a|an|the)\b", " ", text).split()


def _qa_pairs(benchmark: str, problem, answers: list[str], split_parts: bool) -> list[dict]:
    answer = answers[0]
    n = len(_tokens(answer))
    if n == 0:  # AFlow's F1 is 0 without a common token, even for two empty answers
        return [_pair(benchmark, problem, "exact, no tokens", answer, 0.0)]
    pairs = [("exact", answer, 1.0), ("wrong", JUNK[0], 0.0), ("empty", "", 0.0)]
    if _tokens(answer.upper() + ".") == _tokens(answer):
        pairs.append(("upper case, full stop", answer.upper() + ".", 1.0))
    if n and len(answers) == 1 and len(set(_tokens(answer))) == n:
        # one reference, distinct tokens, junk tokens outside it: F1 has a closed form
        pairs += [
            ("one junk token after", f"{answer} {JUNK[0]}", 2 * n / (2 * n + 1)),
            ("two junk tokens before", f"{JUNK[1]} {JUNK[2]} {answer}", 2 * n / (2 * n + 2)),
        ]
        if n >= 2:
            m = n // 2
            pairs.append(("first half", " ".join(_tokens(answer)[:m]), 2 * m / (m + n)))
    if split_parts:
        pairs += [("answer | junk", f"{answer} | {JUNK[3]}", 1.0), ("junk | answer", f"{JUNK[3]}|{answer}", 1.0)]
    return [_pair(benchmark, problem, *p) for p in pairs]


def hotpotqa_pairs(problem) -> list[dict]:
    return _qa_pairs("hotpotqa", problem, problem.reference["answers"], split_parts=False)


def drop_pairs(problem) -> list[dict]:
    answers = [a for a in problem.reference["answers"] if a.strip()]
    return _qa_pairs("drop", problem, answers, split_parts=True) if answers else []


def _code_pairs(benchmark: str, problem, gold: str) -> list[dict]:
    entry = problem.reference["entry_point"]
    preloaded = r"import (math|re|hashlib)|from typing import (List|Dict|Tuple|Optional|Any)(, (List|Dict|Tuple|Optional|Any))*"
    without_preloaded = "\n".join(line for line in gold.splitlines() if not re.fullmatch(preloaded + r"\s*", line))
    pairs = [
        ("as given", gold, 1.0),
        ("fenced in prose", f"Here is my solution:\n\n```python\n{gold}\n```\n\nIt passes the examples.", 1.0),
        ("with top-level calls", f"{gold}\n\nprint({entry})\n_parity_demo = None\n", 1.0),
        ("main guard", f"{gold}\n\nif __name__ == '__main__':\n    print('ok')\n", 1.0),
        ("preloaded imports left out", without_preloaded, 1.0),
        ("stub", f"def {entry}(*args, **kwargs):\n    raise NotImplementedError\n", 0.0),
        ("syntax error", f"def {entry}(:\n    return\n", 0.0),
        ("wrong name", re.sub(rf"def\s+{re.escape(entry)}\s*\(", f"def {entry}_v2(", gold) + "\n", 0.0),
    ]
    rows = [_pair(benchmark, problem, *p) for p in pairs]
    # AFlow runs `check` in a thread and counts an empty result as a pass: SystemExit is one.
    rows.append(_pair(benchmark, problem, "SystemExit in the call",
                      f"def {entry}(*args, **kwargs):\n    raise SystemExit(0)\n", 1.0, "systemexit-passes", 0.0))
    return rows


def humaneval_pairs(problem) -> list[dict]:
    return _code_pairs("humaneval", problem, problem.gold)


def mbpp_pairs(problem) -> list[dict]:
    return _code_pairs("mbpp", problem, problem.gold)


BUILDERS = {"gsm8k": gsm8k_pairs, "math": math_pairs, "hotpotqa": hotpotqa_pairs, "drop": drop_pairs,
            "humaneval": humaneval_pairs, "mbpp": mbpp_pairs}


def build(data_dir: Path, per_benchmark: int | None = None) -> list[dict]:
    """Every pair, in a fixed order; `per_benchmark` caps the problems read per benchmark."""
    rows = []
    for name, builder in BUILDERS.items():
        bench = get_benchmark(name)
        problems = [p for split in bench.splits if bench.file(data_dir, split).is_file()
                    for p in bench.load(split, data_dir)]
        for problem in problems[:per_benchmark]:
            rows += builder(problem)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--out", default=None, help="JSONL file (default: stdout)")
    parser.add_argument("--per-benchmark", type=int, default=None)
    args = parser.parse_args()
    rows = build(Path(args.data_dir), args.per_benchmark)
    text = "".join(json.dumps(row) + "\n" for row in rows)
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")
    else:
        print(text, end="")


if __name__ == "__main__":
    main()
