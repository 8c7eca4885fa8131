"""Tolerant extraction from LLM text: tags, code blocks, letters, booleans.

Nothing here raises on malformed text: each function returns its best reading or a
documented empty value, so an operator can fall back instead of crashing a workflow.
"""

from __future__ import annotations

import ast
import re

# What ast.parse raises on hostile text, besides SyntaxError: MemoryError or RecursionError when
# nesting is deeper than CPython's parser stack (20,000 unary minus signs fit in one answer), and
# ValueError for a null byte on some 3.11 releases. A parse of untrusted text catches all of them.
PARSE_ERRORS = (SyntaxError, ValueError, MemoryError, RecursionError)

_FENCE = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)


def extract_tag(text: str, tag: str) -> str | None:
    """Content of the last complete <tag>...</tag>; an unclosed final tag runs to the end."""
    text = str(text)
    closed = re.findall(rf"<{tag}>(.*?)</{tag}>", text, re.DOTALL | re.IGNORECASE)
    if closed:
        return closed[-1].strip()
    opened = re.search(rf"<{tag}>(.*)\Z", text, re.DOTALL | re.IGNORECASE)
    return opened.group(1).strip() if opened else None


def code_blocks(text: str) -> list[str]:
    return [body for lang, body in _FENCE.findall(str(text)) if lang.lower() in ("", "python", "py", "python3")]


def parses(code: str) -> bool:
    try:
        ast.parse(code)
        return True
    except PARSE_ERRORS:
        return False


def extract_code(text: str, entry_point: str | None = None) -> str:
    """The Python code in an answer: the fenced block defining `entry_point`, else the
    longest block that parses, else the text itself when it parses, else ''."""
    blocks = code_blocks(text) or [str(text)]
    if entry_point:
        defining = [b for b in blocks if re.search(rf"\bdef\s+{re.escape(entry_point)}\s*\(", b)]
        if defining:
            blocks = defining
    valid = [b for b in blocks if parses(b)]
    if valid:
        return max(valid, key=len).strip("\n")
    return ""


def extract_letter(text: str, choices: int) -> int | None:
    """Index of a chosen solution letter (A, B, ...), from a tag or the last bare letter."""
    letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"[:choices]
    tagged = extract_tag(text, "solution_letter")
    for candidate in filter(None, (tagged, str(text))):
        found = re.findall(rf"\b([{letters}])\b", candidate.upper() if candidate is tagged else candidate)
        if found:
            return letters.index(found[-1])
    return None


def extract_bool(text: str | None) -> bool | None:
    if text is None:
        return None
    word = re.search(r"\b(true|false|yes|no|correct|incorrect|pass|fail)\b", str(text), re.IGNORECASE)
    if not word:
        return None
    return word.group(1).lower() in ("true", "yes", "correct", "pass")
