"""`aflow evaluate` a newcomer can trust: set-up errors are one line and exit 2 before anything
expensive starts, earlier results are never overwritten silently, Ctrl-C keeps what was done.
Real subprocesses, real HTTP servers (tests/fake_openai.py, `python3 -m http.server`), real signals.
Needs benchmark data: --data-dir or $AFLOW_DATA_DIR."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import no_data
from tests.fake_openai import FakeOpenAI

REPO = Path(__file__).resolve().parents[1]


def rows_of(path: Path, n: int) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for _, line in zip(range(n), f, strict=False)]


def gold_reply(rows: list[dict]):
    def reply(messages: list[dict]) -> str:
        prompt = str(messages[-1].get("content", ""))
        for row in rows:
            if row["question"] in prompt:
                return f"The answer is {row['answer']}"
        return "The answer is 0"
    return reply


def env_for(tmp_path: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AFLOW_") and not k.endswith("_API_KEY")}
    env["XDG_CACHE_HOME"] = str(tmp_path / "xdg-cache")
    env["PYTHONPATH"] = str(REPO)  # the subprocess imports this checkout's aflow
    return env


def command(data_dir: Path | None, *args: str, base_url: str | None = None, sub: str = "evaluate") -> list[str]:
    cmd = [sys.executable, "-m", "aflow.cli", sub, *args]
    if data_dir is not None:
        cmd += ["--data-dir", str(data_dir)]
    if base_url is not None:
        cmd += ["--executor-base-url", base_url, "--executor-model", "fake-model"]
    return cmd


def run(tmp_path: Path, cmd: list[str], timeout: float = 90) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, env=env_for(tmp_path), cwd=REPO, timeout=timeout)


def one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> str:
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "error" in lines[0] and "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ---- 1. an endpoint that does not answer a chat completion ------------------------------

@pytest.mark.parametrize("suffix", ["/v1", ""])
def test_a_server_that_is_not_openai_is_a_setup_error(tmp_path, gsm8k, plain_http_server, suffix):
    started = time.monotonic()
    result = run(tmp_path, command(gsm8k.parent, "--benchmark", "gsm8k", "--limit", "2", "--no-cache",
                                   "--out", str(tmp_path / "out"), base_url=plain_http_server + suffix))
    one_line_error(result, "test chat completion", "HTTP 501", plain_http_server + suffix, "/v1")
    # exit 2 at set-up (above) is what shows no problem ran, let alone retried; this only bounds a hang
    assert time.monotonic() - started < 60
    assert not (tmp_path / "out" / "summary.json").exists()


def test_a_server_failing_every_chat_is_a_setup_error(tmp_path, gsm8k):
    with FakeOpenAI(default_fault="500") as fake:
        result = run(tmp_path, command(gsm8k.parent, "--benchmark", "gsm8k", "--limit", "2", "--no-cache",
                                       base_url=fake.base_url))
        count = fake.count
    one_line_error(result, "failed a test chat completion 5 times (first: HTTP 500", "; last: HTTP 500")
    assert count == 5  # the probe's tries (the client's 4 retries), and no problem was run


def test_a_rate_limited_api_at_start_up_is_waited_for_not_refused(tmp_path, gsm8k):
    """429s (with Retry-After: 0), a 503 and a dropped connection before the first answer: transient, so
    the probe keeps trying with the client's own backoff, and the run goes ahead."""
    with FakeOpenAI() as fake:
        fake.add_faults(["429", "429", "500", "bad_json"])
        result = run(tmp_path, command(gsm8k.parent, "--benchmark", "gsm8k", "--limit", "1", "--no-cache",
                                       "--json", base_url=fake.base_url))
        faults = [r.fault for r in fake.chat_requests[:5]]
    assert result.returncode == 0, result.stderr
    assert faults == ["429", "429", "500", "bad_json", None]


def test_start_up_errors_name_the_first_and_the_last_failure(tmp_path, gsm8k):
    with FakeOpenAI(default_fault="500") as fake:
        fake.add_faults(["429"])
        result = run(tmp_path, command(gsm8k.parent, "--benchmark", "gsm8k", "--limit", "1", "--no-cache",
                                       base_url=fake.base_url))
    one_line_error(result, "5 times (first: HTTP 429", "last: HTTP 500")


# ---- 3. invalid numbers: one line, exit 2, nothing started --------------------------------

@pytest.mark.parametrize("sub,args,fragment", [
    ("evaluate", ["--limit", "0"], "--limit"),
    ("evaluate", ["--limit", "-1"], "--limit"),
    ("evaluate", ["--concurrency", "0"], "--concurrency"),
    ("evaluate", ["--concurrency", "-2"], "--concurrency"),
    ("evaluate", ["--limit", "two"], "--limit"),
    ("optimize", ["--limit", "0"], "--limit"),
    ("optimize", ["--limit", "-1"], "--limit"),
    ("optimize", ["--concurrency", "0"], "--concurrency"),
])
def test_invalid_numbers_are_one_line_and_exit_2(tmp_path, gsm8k, fake_openai, sub, args, fragment):
    extra = ["--workspace", str(tmp_path / "ws")] if sub == "optimize" else ["--out", str(tmp_path / "out")]
    result = run(tmp_path, command(gsm8k.parent, "--benchmark", "gsm8k", *extra, *args, sub=sub,
                                   base_url=fake_openai.base_url), timeout=30)
    one_line_error(result, fragment, "positive integer")
    assert fake_openai.requests == []
    assert not (tmp_path / "out").exists() and not (tmp_path / "ws").exists()


def test_benchmark_name_in_any_case(tmp_path, gsm8k):
    result = run(tmp_path, command(gsm8k.parent, "--benchmark", "GSM8K", "--workflow", "builtin:gold",
                                   "--limit", "2", "--json"))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.splitlines()[-1])["benchmark"] == "gsm8k"


# ---- 4. a re-run never destroys the earlier results --------------------------------------

def test_rerun_refuses_then_resumes_then_overwrites(tmp_path, gsm8k):
    rows = rows_of(gsm8k, 5)
    out = tmp_path / "out"
    base = ["--benchmark", "gsm8k", "--no-cache", "--out", str(out), "--json"]
    with FakeOpenAI(reply=gold_reply(rows)) as fake:
        first = run(tmp_path, command(gsm8k.parent, *base, "--limit", "3", base_url=fake.base_url))
        assert first.returncode == 0, first.stderr
        before = {name: (out / name).read_bytes() for name in ("results.jsonl", "summary.json")}

        again = run(tmp_path, command(gsm8k.parent, *base, "--limit", "3", base_url=fake.base_url))
        one_line_error(again, "--overwrite", "--resume", str(out))
        assert {name: (out / name).read_bytes() for name in before} == before  # untouched

        fake.reset()
        resumed = run(tmp_path, command(gsm8k.parent, *base, "--limit", "5", "--resume", base_url=fake.base_url))
        assert resumed.returncode == 0, resumed.stderr
        assert fake.count == 1 + 2  # the start-up probe, then only the two problems not yet recorded
        summary = json.loads(resumed.stdout.splitlines()[-1])
        assert (summary["n"], summary["resumed"], summary["score"]) == (5, 3, 1.0)
        records = read_jsonl(out / "results.jsonl")
        assert [r["id"] for r in records] == [str(row["id"]) for row in rows]  # problem order
        assert "carried over" in resumed.stdout

        wrong = run(tmp_path, command(gsm8k.parent, *base, "--limit", "5", "--resume", "--scoring", "reward",
                                      base_url=fake.base_url))
        one_line_error(wrong, "cannot resume", "scoring")

        fake.reset()
        overwritten = run(tmp_path, command(gsm8k.parent, *base, "--limit", "2", "--overwrite",
                                            base_url=fake.base_url))
        assert overwritten.returncode == 0, overwritten.stderr
        assert fake.count == 1 + 2
    assert len(read_jsonl(out / "results.jsonl")) == 2
    assert json.loads((out / "summary.json").read_text())["n"] == 2


# ---- 5. a bad --out: one line, before the embedded server starts ---------------------------

def _unwritable_dir(tmp_path: Path) -> Path:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        (locked / "probe").touch()
    except OSError:
        return locked
    (locked / "probe").unlink()  # root ignores the mode: use a directory the kernel refuses to write
    for candidate in (Path("/sys/kernel"), Path("/proc/1")):
        try:
            (candidate / "aflow-probe").touch()
        except OSError:
            return candidate
    pytest.skip("no unwritable directory available")


@pytest.mark.parametrize("kind", ["file", "read-only", "under-a-file"])
def test_bad_out_is_one_line_before_the_embedded_server(tmp_path, gsm8k, kind):
    (tmp_path / "a-file").write_text("x")
    out = {"file": tmp_path / "a-file", "under-a-file": tmp_path / "a-file" / "sub",
           "read-only": _unwritable_dir(tmp_path)}[kind]
    started = time.monotonic()
    result = run(tmp_path, command(gsm8k.parent, "--benchmark", "gsm8k", "--limit", "1", "--out", str(out)),
                 timeout=60)
    one_line_error(result, "--out", str(out))
    assert "starting the embedded" not in result.stderr  # what shows the server never started
    assert time.monotonic() - started < 45  # a hang guard (~1.5 s here), below the run's 60 s timeout


# ---- 6. a workflow that fails its checks; records carry the expected answer ----------------

@pytest.mark.parametrize("source,fragment", [
    ("class Workflow:\n    async def __call__(self, problem:\n        return 1\n", "does not parse"),
    ("import os\nclass Workflow:\n    async def __call__(self, problem):\n        return os.getcwd()\n", "'os'"),
    ("from aflow_ops import Nope\nclass Workflow:\n    async def __call__(self, problem):\n        return 1\n",
     "does not load: ImportError"),
    ("X = 1 / 0\nclass Workflow:\n    async def __call__(self, problem):\n        return 1\n",
     "does not load: ZeroDivisionError"),
    ("class Workflow:\n    def __init__(self):\n        raise ValueError('bad init')\n"
     "    async def __call__(self, problem):\n        return 1\n", "bad init"),
])
def test_rejected_workflow_is_one_setup_error(tmp_path, gsm8k, fake_openai, source, fragment):
    wf = tmp_path / "wf"
    wf.mkdir()
    (wf / "graph.py").write_text(source)
    result = run(tmp_path, command(gsm8k.parent, "--benchmark", "gsm8k", "--workflow", str(wf), "--limit", "2",
                                   "--out", str(tmp_path / "out"), base_url=fake_openai.base_url))
    line = one_line_error(result, "workflow", str(wf), fragment)
    assert line.count(fragment) == 1
    assert fake_openai.requests == []
    assert not (tmp_path / "out" / "results.jsonl").exists()


def test_records_carry_the_expected_answer(tmp_path, gsm8k, fake_openai):
    rows = rows_of(gsm8k, 2)  # the fake answers 42: wrong, and the record says what was expected
    result = run(tmp_path, command(gsm8k.parent, "--benchmark", "gsm8k", "--limit", "2", "--no-cache",
                                   "--out", str(tmp_path / "out"), base_url=fake_openai.base_url))
    assert result.returncode == 0, result.stderr
    records = read_jsonl(tmp_path / "out" / "results.jsonl")
    assert [r["expected"] for r in records] == [str(row["answer"]) for row in rows]
    assert all(r["tests"] is None for r in records)


def test_code_records_carry_the_solution_and_tests(tmp_path, data_dir):
    if not (data_dir / "mbpp_validate.jsonl").is_file():
        no_data("no mbpp_validate.jsonl in the data directory")
    row = rows_of(data_dir / "mbpp_validate.jsonl", 1)[0]
    result = run(tmp_path, command(data_dir, "--benchmark", "mbpp", "--workflow", "builtin:gold", "--limit", "1",
                                   "--out", str(tmp_path / "out")))
    assert result.returncode == 0, result.stderr
    [record] = read_jsonl(tmp_path / "out" / "results.jsonl")
    assert record["expected"] == row["code"]  # task 802: 132 characters (none cut), no reference erratum
    assert row["test"][:200] in record["tests"]


# ---- 8. Ctrl-C keeps what was done, quickly, and says so ---------------------------------

def test_ctrl_c_keeps_completed_records_and_says_where(tmp_path, gsm8k):
    out = tmp_path / "out"
    # The probe and the first two problems are answered; every later call stalls for an hour (ended
    # when the fake stops), so only cancelling them can end the run soon after Ctrl-C.
    with FakeOpenAI(faults=["ok"] * 3, default_fault="stall", stall_seconds=3600) as fake:
        process = subprocess.Popen(
            command(gsm8k.parent, "--benchmark", "gsm8k", "--limit", "6", "--concurrency", "2", "--no-cache",
                    "--out", str(out), "--json", base_url=fake.base_url),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env_for(tmp_path), cwd=REPO)
        try:
            deadline = time.monotonic() + 60
            results = out / "results.jsonl"
            while not (results.exists() and len(results.read_text().splitlines()) >= 2):
                assert process.poll() is None, process.communicate()
                assert time.monotonic() < deadline, "no record written"
                time.sleep(0.05)
            while fake.in_flight < 2:  # the next two problems are mid-call
                assert process.poll() is None, process.communicate()
                assert time.monotonic() < deadline, "the next problems never called"
                time.sleep(0.05)
            process.send_signal(signal.SIGINT)
            sent = time.monotonic()
            stdout, stderr = process.communicate(timeout=30)
            took = time.monotonic() - sent
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    assert process.returncode == 130, stderr
    assert took < 15.0, took  # the stalled calls were cancelled, not awaited (an hour)
    records = read_jsonl(out / "results.jsonl")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["interrupted"] is True and summary["planned"] == 6
    assert summary["n"] == len(records) >= 2 and len(records) < 6
    assert json.loads(stdout.splitlines()[-1]) == summary
    last = stderr.strip().splitlines()[-1]
    assert "interrupted" in last and f"{len(records)} of 6" in last
    assert str(out / "results.jsonl") in last and str(out / "summary.json") in last and "--resume" in last
    assert "Traceback" not in stderr


# ---- minor points ------------------------------------------------------------------------

def test_without_out_the_final_line_says_nothing_was_saved(tmp_path, gsm8k):
    result = run(tmp_path, command(gsm8k.parent, "--benchmark", "gsm8k", "--workflow", "builtin:gold",
                                   "--limit", "2"))
    assert result.returncode == 0, result.stderr
    assert "not saved" in result.stdout.strip().splitlines()[-1]


def test_results_in_problem_order_and_summary_readable_by_others(tmp_path, gsm8k):
    rows = rows_of(gsm8k, 4)
    slow_first = {row["question"]: 1.0 - 0.3 * i for i, row in enumerate(rows)}  # first problem ends last

    def reply(messages):
        prompt = str(messages[-1].get("content", ""))
        for question, delay in slow_first.items():
            if question in prompt:
                time.sleep(delay)
        return "The answer is 1"

    with FakeOpenAI(reply=reply) as fake:
        result = run(tmp_path, command(gsm8k.parent, "--benchmark", "gsm8k", "--limit", "4", "--no-cache",
                                       "--concurrency", "4", "--out", str(tmp_path / "out"), base_url=fake.base_url))
    assert result.returncode == 0, result.stderr
    assert [r["id"] for r in read_jsonl(tmp_path / "out" / "results.jsonl")] == [str(r["id"]) for r in rows]
    old = os.umask(0o022)
    os.umask(old)
    if old == 0o022:
        for name in ("summary.json", "results.jsonl"):
            assert stat.S_IMODE((tmp_path / "out" / name).stat().st_mode) == 0o644, name


def test_serve_executor_on_a_busy_port_says_so(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run(tmp_path, [sys.executable, "-m", "aflow.cli", "serve-executor", "--port", str(port)],
                     timeout=60)
    one_line_error(result, f"port {port}", "in use")
