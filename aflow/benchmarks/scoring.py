"""Answer extraction and comparison, as AFlow scores each benchmark."""

from __future__ import annotations

import ast
import re
import string
from collections import Counter

_NUMBER = re.compile(r"[-+]?\d+(?:,\d{3})*(?:\.\d+)?|\d+\.\d+")


def last_number(text: str) -> float | None:
    matches = _NUMBER.findall(str(text))
    if not matches:
        return None
    try:
        return float(matches[-1].replace(",", ""))
    except ValueError:
        return None


def number_score(output: str, expected: str, tolerance: float = 1e-6) -> float:
    predicted = last_number(output)
    target = last_number(expected)
    if predicted is None or target is None:
        return 0.0
    return 1.0 if abs(predicted - target) <= tolerance else 0.0


def last_boxed(text: str) -> str | None:
    """The content of the last \\boxed{...} (or \\fbox{...}), braces balanced."""
    text = str(text)
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    brace = text.find("{", start)
    if brace < 0:
        return None
    depth = 0
    for i in range(brace, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[brace + 1 : i]
    return None


def _normalize_latex(answer: str) -> str:
    answer = answer.replace("\\left", "").replace("\\right", "").replace("\\!", "").replace("dfrac", "frac")
    answer = answer.replace("tfrac", "frac").replace("^\\circ", "").replace("^{\\circ}", "").replace("\\$", "")
    return re.sub(r"\s+", "", answer).rstrip(".")


def math_score(output: str, solution: str) -> float:
    """1.0 when the last boxed answers are equal after normalization or equivalent by math-verify."""
    reference = last_boxed(solution)
    if reference is None:
        return 0.0
    predicted = last_boxed(output)
    if predicted is None:
        # A bare final line is accepted, as AFlow does when nothing is boxed.
        lines = [line for line in str(output).strip().splitlines() if line.strip()]
        predicted = lines[-1] if lines else ""
    if _normalize_latex(predicted) == _normalize_latex(reference):
        return 1.0
    try:
        from math_verify import parse, verify

        gold = parse("$" + reference + "$")
        guess = parse("$" + predicted + "$")
        return 1.0 if gold and guess and verify(gold, guess) else 0.0
    except Exception:  # math-verify raises on some inputs; a non-verifiable answer is wrong
        return 0.0


def normalize_answer(text: str) -> str:
    """SQuAD normalization: lower case, no punctuation, no articles, single spaces."""
    text = str(text).lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def f1(prediction: str, truth: str) -> float:
    pred, gold = normalize_answer(prediction).split(), normalize_answer(truth).split()
    if not pred or not gold:
        return float(pred == gold)
    common = Counter(pred) & Counter(gold)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(gold)
    return 2 * precision * recall / (precision + recall)


def max_f1(prediction: str, answers: list[str]) -> float:
    return max((f1(prediction, answer) for answer in answers), default=0.0)


def prompt_preamble(prompt: str, solution: str, entry_point: str) -> str:
    """Imports and helper functions of a HumanEval prompt that the solution does not define.

    Generated solutions are whole functions and often drop `from typing import List` or a
    helper the prompt provided (decode_cyclic, poly, ...); the tests would then fail for a
    reason that has nothing to do with the solution."""
    try:
        prompt_tree = ast.parse(prompt)
    except SyntaxError:
        return ""
    try:
        defined = {n.name for n in ast.walk(ast.parse(solution)) if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    except SyntaxError:
        defined = set()
    parts = []
    for node in prompt_tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            parts.append(ast.get_source_segment(prompt, node) or "")
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name not in defined and node.name != entry_point:
            parts.append(ast.get_source_segment(prompt, node) or "")
    return "\n".join(p for p in parts if p)
