"""`aflow evaluate` end to end, as a subprocess, against the local fake OpenAI server with
injected faults: retried faults cost calls, not records; a dead executor costs records, not
the run; set-up problems exit 2 with one line. Needs benchmark data: --data-dir or $AFLOW_DATA_DIR."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fake_openai import FakeOpenAI

REPO = Path(__file__).resolve().parents[1]
# `aflow evaluate` sends one real chat completion at start-up (not counted in the summary): a URL
# that does not answer one is a set-up error. It is the first chat request the server sees.
PROBE = 1

SUMMARY_KEYS = {"benchmark", "split", "n", "score", "errors", "calls", "prompt_tokens", "completion_tokens",
                "cost_usd", "wall_s"}


def gsm8k_rows(path: Path, n: int) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for _, line in zip(range(n), f, strict=False)]


def gold_reply(rows: list[dict]):
    """An executor that knows the answers: finds the question in the prompt, answers it."""

    def reply(messages: list[dict]) -> str:
        prompt = str(messages[-1].get("content", ""))
        for row in rows:
            if row["question"] in prompt:
                return f"Let me think. The answer is {row['answer']}"
        return "The answer is 36"

    return reply


def aflow_evaluate(tmp_path: Path, data_dir: Path, *args: str, base_url: str | None, out: str | None = "out",
                   timeout: float = 60) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AFLOW_") and not k.endswith("_API_KEY")}
    env["XDG_CACHE_HOME"] = str(tmp_path / "xdg-cache")  # never the user's response cache
    env["PYTHONPATH"] = str(REPO)  # this checkout's aflow, whatever is installed
    command = [sys.executable, "-m", "aflow.cli", "evaluate", "--benchmark", "gsm8k", "--split", "validate",
               "--workflow", "builtin:io", "--data-dir", str(data_dir), "--json", *args]
    if base_url is not None:
        command += ["--executor-base-url", base_url, "--executor-model", "fake-model"]
    if out is not None:
        command += ["--out", str(tmp_path / out)]
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=timeout)


def last_json(result: subprocess.CompletedProcess) -> dict:
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.strip().splitlines()
    assert lines, result.stderr[-2000:]
    summary = json.loads(lines[-1])
    assert SUMMARY_KEYS <= set(summary)
    return summary


def read_results(directory: Path) -> list[dict]:
    return [json.loads(line) for line in (directory / "results.jsonl").read_text().splitlines()]


def assert_setup_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("aflow: error: ")
    for fragment in fragments:
        assert fragment in lines[0]
    assert "Traceback" not in result.stderr


def test_injected_faults_are_retried_end_to_end(tmp_path, gsm8k):
    faults = ["429", "500", "stall", "bad_json"]
    rows = gsm8k_rows(gsm8k, 6)
    with FakeOpenAI(reply=gold_reply(rows), faults=["ok", *faults], stall_seconds=1.0, usage=(100, 10)) as fake:
        result = aflow_evaluate(tmp_path, gsm8k.parent, "--limit", "6", "--no-cache", base_url=fake.base_url)
        count = fake.count
        seen = [r.fault for r in fake.chat_requests]
    summary = last_json(result)
    assert (summary["benchmark"], summary["split"], summary["n"]) == ("gsm8k", "validate", 6)
    assert summary["errors"] == 0
    assert summary["score"] == 1.0  # every reply reached the right problem despite the faults
    # every fault cost one retried request: 6 answers + 4 faults
    assert sorted(filter(None, seen)) == sorted(faults)
    assert count - PROBE == summary["calls"] == 6 + len(faults)
    assert (summary["prompt_tokens"], summary["completion_tokens"]) == (600, 60)
    assert summary["cost_usd"] == 0.0  # fake-model has no price
    assert summary["wall_s"] > 0

    out = tmp_path / "out"
    records = read_results(out)
    assert len(records) == 6
    assert {r["id"] for r in records} == {str(row["id"]) for row in rows}
    assert all(r["error"] is None and r["score"] == 1.0 for r in records)
    assert sum(r["calls"] for r in records) == count - PROBE
    assert json.loads((out / "summary.json").read_text()) == summary


def test_dead_executor_fails_every_record_but_not_the_run(tmp_path, gsm8k):
    with FakeOpenAI(faults=["ok"], default_fault="500") as fake:  # dies after the start-up probe
        result = aflow_evaluate(tmp_path, gsm8k.parent, "--limit", "6", "--no-cache", base_url=fake.base_url)
        count = fake.count
    summary = last_json(result)
    assert summary["n"] == 6 and summary["errors"] == 6 and summary["score"] == 0.0
    assert count - PROBE == summary["calls"] == 6 * 5  # the first try and 4 retries each
    records = read_results(tmp_path / "out")
    assert len(records) == 6
    for record in records:
        assert record["error"] and "HTTP 500" in record["error"], record
        assert record["output"] is None and record["score"] == 0.0


def test_second_run_is_answered_from_the_cache(tmp_path, gsm8k):
    cache = tmp_path / "responses.sqlite"
    with FakeOpenAI(reply=gold_reply(gsm8k_rows(gsm8k, 6))) as fake:
        first = last_json(aflow_evaluate(tmp_path, gsm8k.parent, "--limit", "6", "--cache-path", str(cache),
                                         base_url=fake.base_url, out="first"))
        after_first = fake.count
        second = last_json(aflow_evaluate(tmp_path, gsm8k.parent, "--limit", "6", "--cache-path", str(cache),
                                          base_url=fake.base_url, out="second"))
        after_second = fake.count
    assert cache.is_file()
    assert after_first - PROBE == first["calls"] == 6 and first["cached_calls"] == 0
    assert after_second == after_first + PROBE  # no new chat request but the start-up probe
    assert second["calls"] == 0 and second["cached_calls"] == 6
    assert second["score"] == first["score"] == 1.0
    assert (second["prompt_tokens"], second["completion_tokens"]) == (0, 0)
    assert [r["output"] for r in sorted(read_results(tmp_path / "second"), key=lambda r: r["id"])] == \
           [r["output"] for r in sorted(read_results(tmp_path / "first"), key=lambda r: r["id"])]


def test_missing_data_file_exits_2(tmp_path, fake_openai):
    missing = tmp_path / "no-such-dir"
    result = aflow_evaluate(tmp_path, missing, "--limit", "6", "--no-cache", base_url=fake_openai.base_url)
    assert_setup_error(result, "missing data file", str(missing))
    assert fake_openai.count == 0
    assert not (tmp_path / "out" / "summary.json").exists()


def test_unreachable_executor_exits_2(tmp_path, gsm8k):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base_url = f"http://127.0.0.1:{port}/v1"
    result = aflow_evaluate(tmp_path, gsm8k.parent, "--limit", "6", "--no-cache", base_url=base_url)
    assert_setup_error(result, "not reachable", base_url)
    assert not (tmp_path / "out" / "summary.json").exists()


def test_malformed_line_is_one_failed_record(tmp_path, fake_openai, gsm8k):
    rows = gsm8k_rows(gsm8k, 3)
    fake_openai.reply = gold_reply(rows)
    data = tmp_path / "data"
    data.mkdir()
    lines = gsm8k.read_text(encoding="utf-8").splitlines()[:3]
    (data / "gsm8k_validate.jsonl").write_text("\n".join([lines[0], "{this is not json", *lines[1:]]) + "\n")
    result = aflow_evaluate(tmp_path, data, "--no-cache", base_url=fake_openai.base_url)
    summary = last_json(result)
    assert summary["n"] == 4 and summary["errors"] == 1
    assert summary["score"] == pytest.approx(3 / 4)
    assert fake_openai.count - PROBE == summary["calls"] == 3  # the bad line never reached the executor
    records = read_results(tmp_path / "out")
    [bad] = [r for r in records if r["error"] is not None]
    assert "malformed" in bad["error"] and "line 2" in bad["error"]
    assert bad["calls"] == 0 and bad["score"] == 0.0
    good = [r for r in records if r["error"] is None]
    assert {r["id"] for r in good} == {str(row["id"]) for row in rows}
    assert all(r["score"] == 1.0 for r in good)


def test_concurrency_bounds_the_executor_calls_in_flight(tmp_path, gsm8k):
    """`--concurrency C` is the executor's bound: never more than C calls at once, and the
    extra problems kept in flight fill every freed slot, so C are reached."""
    with FakeOpenAI(latency=0.3) as fake:
        result = aflow_evaluate(tmp_path, gsm8k.parent, "--limit", "12", "--concurrency", "3", "--no-cache",
                                base_url=fake.base_url)
        assert result.returncode == 0, result.stderr
        assert fake.count == 12 + PROBE
        assert fake.max_in_flight == 3


ENSEMBLE_GRAPH = '''from aflow_ops import Custom, ScEnsemble


class Workflow:
    def __init__(self):
        self.custom = Custom()
        self.sc_ensemble = ScEnsemble()

    async def __call__(self, problem):
        solutions = [(await self.custom(input=problem, instruction="Solve."))["response"] for _ in range(3)]
        return (await self.sc_ensemble(solutions=solutions, problem=problem))["response"]
'''


@pytest.mark.parametrize("temperature", [None, "0.3"])
def test_ensemble_members_are_independent_samples_in_aflow_evaluate(tmp_path, gsm8k, temperature):
    """Three identical requests in one run: the first at the executor's temperature, the repeats at
    --sample-temperature (default 0.7) with seeds 1 and 2, so the cache cannot make them one answer."""
    workflow = tmp_path / "ensemble"
    workflow.mkdir()
    (workflow / "graph.py").write_text(ENSEMBLE_GRAPH)
    with FakeOpenAI(reply=lambda messages: "<solution_letter>A</solution_letter>") as fake:
        args = ["--limit", "1", "--workflow", str(workflow)] + (["--sample-temperature", temperature] if temperature else [])
        summary = last_json(aflow_evaluate(tmp_path, gsm8k.parent, *args, base_url=fake.base_url))
        sent = [(r.body.get("temperature"), r.body.get("seed")) for r in fake.chat_requests[PROBE:]]
    expected = float(temperature or 0.7)
    assert summary["calls"] == 4 and sorted(sent[:3], key=str) == sorted([(0.0, None), (expected, 1), (expected, 2)],
                                                                          key=str)
