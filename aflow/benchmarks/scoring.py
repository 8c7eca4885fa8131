"""Answer extraction and comparison, as AFlow scores each benchmark."""

from __future__ import annotations

import dis
import math
import os
import re
import string
import sys
import threading
import types

from aflow.benchmarks import offload

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


# ---- MATH: AFlow's rule (benchmarks/math.py), with its defects fixed -------------------------
#
# AFlow extracts one answer from the reference solution and one from the output the same way
# (the last \boxed{...}, else the last sentence) and calls them equal when the strings are
# equal, or both are numbers within 1e-3 (commas dropped, a trailing % or \% read as /100),
# or both parse as plain sympy expressions whose difference simplifies to 0 or whose values
# are within 1e-3. AFlow also tries sympy's LaTeX parser first, but its pinned environment
# (sympy 1.14, no antlr4) cannot run it, so only plain expressions ever parse: here too.
# Defects fixed (each changes AFlow's score only for the inputs described):
# * \boxed{...} is read with balanced braces at any depth; AFlow's regex reads one level of
#   nesting, so it cannot read \boxed{\frac{6\sqrt{10}}{7}} (9 of the 605 MATH references) and
#   falls back to the last sentence (or to an earlier \boxed).
# * \fbox{...} is read like \boxed{...} (AFlow ignores it).
# * Answer text is never evaluated as code: AFlow hands arbitrary answer text to sympy's
#   parse_expr (and to sympify via N), which runs eval on it. Here only strings made of plain
#   math (`plain_math`) are parsed, and the eval itself is guarded (`_guard_sympy_eval`).
# * `^` is a power, as sympify reads it; AFlow's parse_expr reads it as Python's XOR, so it
#   scores "2^3" equal to "1" but not to "8" (while "2.0^3", which XOR cannot take, equals 8).
# * Single letters are symbols: AFlow's parse_expr reads N, O, Q and S as sympy's objects
#   (N is a function), so "N+1" is not equal to "1+N" there. E and I stay e and i.
# * An empty reference answer matches nothing (AFlow: an empty output equals it).
# The comparison is the same for both scoring variants: MATH extracts one answer, so there is
# no hedging channel to close.

_BOXED = re.compile(r"\\(?:boxed|fbox)\{")
_SENTENCE_END = re.compile(r"(?<!\d)[.!?]\s+")


def last_boxed(text: str) -> str | None:
    """The content of the last \\boxed{...} or \\fbox{...} whose braces balance, at any depth
    (as AFlow's `re.findall` reads them, left to right and not overlapping), else None.
    Linear in the length of the text, whatever it holds."""
    text = str(text)
    closing: dict[int, int] = {}  # index of each "{" that closes -> index of its "}"
    stack: list[int] = []
    for i, ch in enumerate(text):
        if ch == "{":
            stack.append(i)
        elif ch == "}" and stack:
            closing[stack.pop()] = i
    found, resume = None, 0
    for match in _BOXED.finditer(text):
        brace = match.end() - 1
        if brace < resume or brace not in closing:
            continue
        found, resume = text[brace + 1 : closing[brace]], closing[brace] + 1
    return found


def math_answer(text: str) -> str:
    """AFlow's `extract_model_answer`: the last boxed answer, stripped, else the last non-empty
    sentence, else ""."""
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    sentences = [s.strip() for s in _SENTENCE_END.split(str(text)) if s.strip()]
    return sentences[-1] if sentences else ""


def parse_digits(text: str) -> float | None:
    """AFlow's `parse_digits`: float() of the text without commas, or of the text before a
    trailing % (or \\%) divided by 100, else None."""
    text = str(text).replace(",", "")
    try:
        return float(text)
    except ValueError:
        pass
    if text.endswith("%"):
        text = text[:-1]
        if text.endswith("\\"):
            text = text[:-1]
        try:
            return float(text) / 100
        except ValueError:
            pass
    return None


# Plain math, the only text sympy parses: numbers, + - * / ^ ** ( ), whitespace, single
# letters (symbols; E and I are e and i) and these names. No underscores, quotes, brackets
# other than parentheses, commas, dots outside numbers, keywords or other names: what sympy
# turns into code from such text is number and symbol constructors, arithmetic and calls of
# these functions.
MATH_NAMES = frozenset({"sqrt", "pi", "E", "I", "oo", "sin", "cos", "tan", "cot", "sec", "csc", "asin", "acos",
                        "atan", "log", "ln", "exp"})
_PLAIN_TOKEN = re.compile(r"[ \t\r\n]+|[0-9]+(?:\.[0-9]*)?|\.[0-9]+|\*\*|[-+*/^()]|[A-Za-z][A-Za-z0-9]*")


def plain_math(text: str) -> bool:
    """True when `text` is plain math (see MATH_NAMES): what may reach sympy's parser. Names are
    read as Python reads them (a letter, then letters and digits), so `x1` or `e5` is one name."""
    text = str(text)
    if not text.strip() or len(text) > MAX_MATH_ANSWER_CHARS:
        return False
    at = 0
    while at < len(text):
        token = _PLAIN_TOKEN.match(text, at)
        if token is None:
            return False
        word = token.group()
        if word[0].isalpha() and len(word) > 1 and word not in MATH_NAMES:
            return False
        at = token.end()
    return True


# Sympy (parse_expr, simplify, N) runs in a worker process with a time bound
# (aflow.benchmarks.offload): simplify can take minutes or hang, and powers such as 9^9^9^9
# exhaust memory. Only pairs that the cheap checks in the event loop cannot decide go there:
# those whose two answers are both plain math.
MATH_SCORE_TIMEOUT_S = 10.0
# Far above any MATH reference answer (the longest of the 605 has 57 characters): longer
# answers are wrong without parsing, and never reach the worker.
MAX_MATH_ANSWER_CHARS = 4096


def _math_decided(predicted: str, reference: str) -> tuple[float, str | None] | None:
    """The score when it needs no sympy (cheap, safe in the event loop), else None."""
    if not reference:
        return 0.0, None
    if predicted == reference:
        return 1.0, None
    if len(predicted) > MAX_MATH_ANSWER_CHARS:
        return 0.0, f"answer too long to verify ({len(predicted)} characters)"
    p, r = parse_digits(predicted), parse_digits(reference)
    if p is not None and r is not None:
        return (1.0 if math.isclose(p, r, abs_tol=1e-3) else 0.0), None
    if not (plain_math(predicted) and plain_math(reference)):
        return 0.0, None  # AFlow: text that does not parse is never equal to a different text
    return None


def math_score(output: str, solution: str) -> float:
    """AFlow's MATH score (see above) of `output` against the reference `solution`. Pure and
    blocking (sympy runs in this thread); the benchmark scores through `math_score_bounded`,
    which gives the same results off the event loop."""
    predicted, reference = math_answer(output), math_answer(solution)
    decided = _math_decided(predicted, reference)
    if decided is not None:
        return decided[0]
    return math_equivalent(predicted, reference)


def math_score_bounded(output: str, solution: str, timeout: float | None = None):
    """`math_score` for the event loop: (score, reason) at once when the cheap checks decide,
    else an awaitable of it that runs sympy in the scoring worker, bounded by `timeout`
    (MATH_SCORE_TIMEOUT_S). A timeout or a crashed worker is a wrong answer with the reason,
    never an exception."""
    predicted, reference = math_answer(output), math_answer(solution)
    decided = _math_decided(predicted, reference)
    if decided is not None:
        return decided
    return _math_equivalent_offloaded(predicted, reference, MATH_SCORE_TIMEOUT_S if timeout is None else timeout)


async def _math_equivalent_offloaded(predicted: str, reference: str, timeout: float) -> tuple[float, str | None]:
    try:
        value = await offload.run_bounded(math_equivalent, predicted, reference, timeout=timeout, pool=MATH_POOL)
    except offload.Timeout:
        return 0.0, f"scoring timed out after {timeout:g} s"
    except offload.OffloadError as exc:
        return 0.0, f"scoring failed: {exc}"
    if isinstance(value, bool) or value not in (0, 1):  # only a subverted worker would say anything else
        return 0.0, "scoring worker returned an invalid result"
    return float(value), None


def _sympy_value(text: str):
    """The sympy expression of plain-math `text`, else None. As AFlow's `_parse` (parse_expr),
    then as the `sympify` inside its `N` reads a string (newlines removed); with `^` a power
    and single letters symbols (see above)."""
    if not plain_math(text):
        return None
    from sympy import Symbol
    from sympy.parsing.sympy_parser import convert_xor, parse_expr, standard_transformations

    letters = {c: Symbol(c) for c in string.ascii_letters if c not in "EI"}
    for candidate in dict.fromkeys((text, text.replace("\n", ""))):
        try:
            with _untrusted_text():
                return parse_expr(candidate, local_dict=dict(letters),
                                  transformations=standard_transformations + (convert_xor,))
        except Exception:  # sympy raises anything on odd input: not parseable
            continue
    return None


def math_equivalent(predicted: str, reference: str) -> float:
    """1.0 when two plain-math answers are equal as AFlow's `symbolic_equal` decides:
    simplify(a - b) == 0, else N(a) and N(b) within 1e-3. Pure (it runs in the scoring worker).
    Text that is not plain math is not parsed (never eval'd) and is equal to nothing."""
    from math import isclose

    from sympy import N, simplify

    _guard_sympy_eval()
    a, b = _sympy_value(predicted), _sympy_value(reference)
    if a is None or b is None:
        return 0.0
    try:
        if simplify(a - b) == 0:
            return 1.0
    except Exception:  # AFlow: any failure is "not equal"
        pass
    try:
        if isclose(N(a), N(b), abs_tol=1e-3):
            return 1.0
    except Exception:
        pass
    return 0.0


def _math_warmup() -> None:
    """Runs once in each new scoring worker, before its first timed call: the imports and
    sympy's lazy set-up would otherwise be charged to the first answer's time bound."""
    for predicted, reference in (("0.5", "1/2"), ("(x+1)^2", "x^2+2*x+1"), ("2*sqrt(2)", "sqrt(8)"),
                                 ("3.1416", "pi"), ("2+m", "m+2"), ("A", "D"), ("exp(1)", "E"),
                                 ("sin(pi/6)", "1/2"), ("log(8)/log(2)", "3")):
        math_equivalent(predicted, reference)


# ---- no eval of answer text: a guard on sympy's one eval site ------------------------------

_UNTRUSTED = threading.local()
_GUARD_LOCK = threading.Lock()
# What sympy's parse_expr generates from plain math (auto_number, auto_symbol, evaluate=False
# or not): number and symbol constructors, the arithmetic node types, and MATH_NAMES.
_ARITHMETIC_NAMES = frozenset({"Integer", "Float", "Rational", "Symbol", "Add", "Mul", "Pow"}) | MATH_NAMES
# Opcodes plain math never compiles to: attribute access, imports, assignments.
_REFUSED_OPCODES = frozenset({"LOAD_ATTR", "LOAD_METHOD", "LOAD_SUPER_ATTR", "STORE_ATTR", "DELETE_ATTR",
                              "IMPORT_NAME", "IMPORT_FROM", "IMPORT_STAR", "STORE_NAME", "STORE_GLOBAL",
                              "DELETE_NAME", "DELETE_GLOBAL", "STORE_FAST", "STORE_DEREF"})


def _untrusted_text():
    return offload.marked(_UNTRUSTED)


def _arithmetic_only(code, local_dict: dict | None = None) -> bool:
    """True when `code` (a string or code object for sympy's eval) can do nothing but build
    expressions: every name it uses is a number or symbol constructor, an arithmetic node,
    one of MATH_NAMES or a name `local_dict` binds to a Symbol; it accesses no attribute,
    imports and assigns nothing, and defines no functions."""
    if isinstance(code, str):
        try:
            code = compile(code, "<string>", "eval")
        except (SyntaxError, ValueError):
            return False
    if not isinstance(code, types.CodeType):
        return False
    from sympy import Symbol

    symbols = {name for name, value in (local_dict or {}).items() if isinstance(value, Symbol)}
    if not set(code.co_names) <= _ARITHMETIC_NAMES | symbols:
        return False
    if code.co_varnames or code.co_cellvars or code.co_freevars:
        return False
    if any(isinstance(c, types.CodeType) for c in code.co_consts):
        return False
    return not any(instruction.opname in _REFUSED_OPCODES for instruction in dis.get_instructions(code))


def _importing() -> bool:
    """True inside an import: sympy imports some modules lazily, mid-parse (units,
    combinatorics), and their top-level code sympifies its own strings, never the answer's."""
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


def _guard_sympy_eval() -> None:
    """Wrap `sympy.parsing.sympy_parser.eval_expr` (where parse_expr, and so sympify of a
    string, calls eval) once per process: under `_untrusted_text()` it refuses code that is
    not `_arithmetic_only`, unless a module is being imported (library code, not the
    answer); elsewhere it behaves as before. Every call is marked for the
    scoring worker's audit hook as validated string code (offload.allow_string_code)."""
    from sympy.parsing import sympy_parser

    with _GUARD_LOCK:
        original = sympy_parser.eval_expr
        if getattr(original, "_aflow_guard", False):
            return

        def eval_expr(code, local_dict, global_dict):
            if getattr(_UNTRUSTED, "depth", 0) and not _arithmetic_only(code, local_dict) and not _importing():
                raise ValueError("refused to evaluate answer text that is not plain math")
            with offload.allow_string_code():
                return original(code, local_dict, global_dict)

        eval_expr._aflow_guard = True  # type: ignore[attr-defined]
        sympy_parser.eval_expr = eval_expr


# Lazy: no process starts until an answer needs sympy. AFLOW_MATH_SCORING_WORKERS sets
# the number of worker processes (default: 2, or 1 on a one-core machine).
MATH_POOL = offload.WorkerPool(
    name="math-scoring", size=int(os.environ.get("AFLOW_MATH_SCORING_WORKERS") or 0) or None,
    preload=("sympy",), warmup=(_math_warmup, ()),
    # parse_expr execs `from sympy import *` to build its namespace; polynomial arithmetic
    # compiles monomial operations for each number of variables.
    trusted_codegen=(("sympy/parsing/sympy_parser.py", "parse_expr"), ("sympy/polys/monomials.py", "_build")),
)
