"""`aflow optimize` and `launch.sh` a newcomer can trust: real processes, a real local
OpenAI-compatible HTTP server (tests/fake_openai.py), real files. One test (or a few) per point
of the issue: --test respects --limit and shows progress; every round says what it did, with an
ETA; meaningless settings are one line, exit 2; repeated validation runs are independent samples;
the report lists every round; launch.sh has its own help and prints the path it writes."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fake_openai import FakeOpenAI
from tests.test_optimize import GRAPH, gold_answers

ROOT = Path(__file__).resolve().parent.parent


def optimize(workspace, server, *extra, data_dir, json_line=True, limit="3", validation_rounds="1"):
    return [sys.executable, "-m", "aflow.cli", "optimize", "--benchmark", "gsm8k", "--workspace", str(workspace),
            "--limit", limit, "--validation-rounds", validation_rounds, "--data-dir", str(data_dir),
            "--optimizer-base-url", server.base_url, "--optimizer-model", "opt",
            "--executor-base-url", server.base_url, "--executor-model", "exe",
            # a cache of the test's own: another test of the session may have asked the same questions
            "--cache-path", str(Path(workspace).parent / "llm-cache.sqlite"),
            *extra] + (["--json"] if json_line else [])


def run(args, timeout=300):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # this checkout's aflow; the tests' private response cache
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)


def work_calls(server) -> int:
    """Chat requests other than the start-up probes (one 1-token "Reply with OK." per endpoint and run,
    which the response cache never answers)."""
    return sum(1 for r in server.requests if r.path.endswith("/chat/completions")
               and not (isinstance(r.body, dict) and r.body.get("max_tokens") == 1))


def reply_with(answers, optimizer_answers=None):
    """Optimizer: the scripted answers in turn (None: a new valid modification); executor: the
    gold answer the first time a question is asked, a wrong one after (so repeats can differ)."""
    counter = itertools.count(1)
    scripted = iter(optimizer_answers or [])
    seen = set()

    def reply(messages):
        text = messages[0]["content"]
        if "You improve agentic workflows" in text:
            n = next(counter)
            answer = next(scripted, None)
            if answer is not None:
                return answer
            return (f"<modification>Use answer style {n}.</modification>\n<graph>\n{GRAPH.format(n=n)}</graph>\n"
                    f"<prompt>\nSTYLE_{n} = 'Answer in style {n}. End with the number.'\n</prompt>")
        known = [q for q in answers if q in text]
        if not known:
            return "The answer is 36"
        if known[0] in seen:
            return "The answer is -1"
        seen.add(known[0])
        return f"The answer is {answers[known[0]]}"

    return reply


GARBAGE = "<modification>x</modification><graph>def broken(:</graph>"


# ---- 2. --test respects --limit and shows progress ------------------------------------------


def test_test_split_is_capped_by_limit_and_says_so(tmp_path, data_dir):
    workspace = tmp_path / "ws"
    with FakeOpenAI(reply=reply_with(gold_answers(data_dir))) as server:
        result = run(optimize(workspace, server, "--rounds", "1", "--test", data_dir=data_dir, limit="2",
                              json_line=False))
        calls = work_calls(server)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = (workspace / "round_1" / "test" / "results.jsonl").read_text().splitlines()
    assert len(rows) == 2  # not the 1,055 problems of the test split
    assert "testing the 1 best workflow(s) on up to 2 (--limit 2) gsm8k test problems each" in result.stderr
    assert "test 1/1: round 1 scored" in result.stderr and "on 2 test problems" in result.stderr
    assert "gsm8k/test" in result.stderr  # the progress bar of the test run
    assert calls == 2 + 2  # validation (2) + test (2)


def test_test_limit_overrides_limit(tmp_path, data_dir):
    workspace = tmp_path / "ws"
    with FakeOpenAI(reply=reply_with(gold_answers(data_dir))) as server:
        result = run(optimize(workspace, server, "--rounds", "1", "--test", "--test-limit", "3",
                              data_dir=data_dir, limit="1"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert len((workspace / "round_1" / "test" / "results.jsonl").read_text().splitlines()) == 3
    assert "on up to 3 (--test-limit 3)" in result.stderr


# ---- 7. meaningless settings, round lines, resume of a finished run, independent repeats ----


@pytest.mark.parametrize("flag,value,words", [("--rounds", "0", "--rounds must be ≥ 1"),
                                              ("--validation-rounds", "0", "--validation-rounds must be ≥ 1")])
def test_zero_rounds_is_one_line_exit_2(tmp_path, data_dir, flag, value, words):
    workspace = tmp_path / "ws"
    with FakeOpenAI() as server:
        args = optimize(workspace, server, data_dir=data_dir) + [flag, value]
        result = run(args, timeout=120)
        assert server.count == 0
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines() == [f"aflow: error: {result.stderr.strip()[len('aflow: error: '):]}"]
    assert words in result.stderr
    assert not workspace.exists()


@pytest.mark.parametrize("role", ["executor", "optimizer"])
def test_an_endpoint_that_is_not_openai_stops_the_search_at_start(tmp_path, data_dir, plain_http_server, role):
    """Issue 12, point 1, for `optimize`: a URL that answers no chat completion is one line, exit 2,
    before round 1 (the search used to score every workflow 0 against it)."""
    workspace = tmp_path / "ws"
    with FakeOpenAI() as server:
        args = optimize(workspace, server, data_dir=data_dir, json_line=False)
        flag = args.index(f"--{role}-base-url")
        args[flag + 1] = plain_http_server + "/v1"
        result = run(args, timeout=120)
        calls = work_calls(server)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.strip().splitlines() if line.startswith("aflow: error")]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert f"{role} {plain_http_server}/v1" in lines[0] and "test chat completion" in lines[0], lines[0]
    assert calls <= 1  # at most the other role's own probe: no round ran
    assert not (workspace / "results.json").exists()  # the check comes first: no round, nothing saved


def test_every_round_says_what_it_did_and_resume_of_a_finished_run_does_nothing(tmp_path, data_dir):
    workspace = tmp_path / "ws"
    reply = reply_with(gold_answers(data_dir), optimizer_answers=[GARBAGE])  # round 2 rejected, round 3 accepted
    with FakeOpenAI(reply=reply) as server:
        first = run(optimize(workspace, server, "--rounds", "3", "--max-retries", "1", data_dir=data_dir))
        calls_after_first = work_calls(server)
        again = run(optimize(workspace, server, "--rounds", "3", "--max-retries", "1", "--resume", data_dir=data_dir))
        calls_after_resume = work_calls(server)
        other = run(optimize(workspace, server, "--rounds", "4", "--resume", "--validation-temperature", "0.3",
                             data_dir=data_dir))
    assert first.returncode == 0, first.stderr[-3000:]
    err = first.stderr
    assert "None" not in err
    assert "round 1/3: evaluating the initial workflow builtin:io (1 validation run on 3 validation problems)" in err
    assert "round 1: validation run 1/1: score" in err
    assert "round 1/3: initial workflow scored" in err
    assert "round 2/3: asking the optimizer to modify round 1" in err
    assert "round 2/3: rejected: no valid modification of round 1 in 1 optimizer answer(s) (last:" in err
    assert "round 3/3: accepted (modified round 1): scored" in err and "vs its parent" in err
    assert "left for 2 more round(s)" in err and "elapsed" in err  # the ETA
    assert again.returncode == 0, again.stderr[-3000:]
    assert "the search is already finished (3 of 3 rounds done); nothing to run" in again.stderr
    assert "continuing at round 4" not in again.stderr
    assert calls_after_resume == calls_after_first  # nothing evaluated, nothing asked
    assert json.loads(again.stdout.strip().splitlines()[-1])["rounds_done"] == 3
    assert other.returncode == 2 and "validation_temperature" in other.stderr  # repeats must stay comparable


def test_repeated_validation_runs_are_independent_samples(tmp_path, data_dir):
    """Run 1 at temperature 0 (cached); runs 2 and 3 sampled at 0.7 with seeds of their own, so
    they reach the executor even with the cache on, and can score differently (std > 0). A second
    search with the same seed is answered from the cache and says so."""
    cache = str(tmp_path / "c.sqlite")
    with FakeOpenAI(reply=reply_with(gold_answers(data_dir))) as server:
        first = run(optimize(tmp_path / "a", server, "--rounds", "1", "--cache-path", cache, data_dir=data_dir,
                             limit="2", validation_rounds="3"))
        executor = [r.body for r in server.chat_requests if r.body["model"] == "exe" and r.body.get("max_tokens") != 1]
        before = work_calls(server)
        second = run(optimize(tmp_path / "b", server, "--rounds", "1", "--cache-path", cache, data_dir=data_dir,
                              limit="2", validation_rounds="3"))
        assert work_calls(server) == before  # every answer from the cache
    assert first.returncode == 0, first.stderr[-3000:]
    assert len(executor) == 6  # 2 problems x 3 runs: the repeats were asked, not read from run 1's cache
    assert sorted(r.get("temperature") for r in executor) == [0.0, 0.0, 0.7, 0.7, 0.7, 0.7]
    seeds = {r.get("seed") for r in executor if r.get("temperature")}
    assert len(seeds) == 2 and None not in seeds
    scores = json.loads((tmp_path / "a" / "round_1" / "scores.json").read_text())
    assert scores["scores"][0] == 1.0 and scores["std"] > 0
    assert second.returncode == 0, second.stderr[-3000:]
    assert json.loads((tmp_path / "b" / "round_1" / "scores.json").read_text())["scores"] == scores["scores"]
    summary = second.stdout.strip().splitlines()[-2]
    assert "0 calls (6 answered from the cache)" in summary
    assert json.loads(second.stdout.strip().splitlines()[-1])["cached_calls"] == 6


# ---- 10. report, plot, results.json ----------------------------------------------------------


def test_report_lists_every_round_and_results_json_is_readable(tmp_path, data_dir):
    workspace = tmp_path / "ws"
    reply = reply_with(gold_answers(data_dir), optimizer_answers=[GARBAGE])
    with FakeOpenAI(reply=reply) as server:
        result = run(optimize(workspace, server, "--rounds", "3", "--max-retries", "1", "--test", "--test-limit", "2",
                              data_dir=data_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    report = (workspace / "report.md").read_text()
    assert "Rounds done: 3 (2 evaluated, 1 rejected)" in report
    table = [line for line in report.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [line.split("|")[1].strip() for line in table] == ["1", "2", "3"]
    assert "| 2 | 1 | rejected |" in table[1] and "static checks" in table[1]
    results = json.loads((workspace / "results.json").read_text())
    assert "rng_state" not in results and len(json.dumps(results)) < 5000
    assert json.loads((workspace / "rng_state.json").read_text())[0] == "MT19937"
    assert [r["round"] for r in results["rejected_rounds"]] == [2]
    assert set(results["round_usage"]) == {"1", "2", "3"}
    png = (workspace / "plot.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_one_round_search_gets_a_report_and_a_plot_with_its_test_score(tmp_path, data_dir):
    """A short search without paid calls: the plot still has a best-so-far line, a calls panel
    instead of an empty cost panel, and the test score; the report is written without --test too."""
    from aflow.search import report

    workspace = tmp_path / "ws"
    with FakeOpenAI(reply=reply_with(gold_answers(data_dir))) as server:
        result = run(optimize(workspace, server, "--rounds", "1", data_dir=data_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    assert (workspace / "report.md").is_file() and (workspace / "plot.png").is_file()
    assert "report.md, plot.png" in result.stdout

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    captured = {}
    original = plt.close

    def keep(fig):
        captured["fig"] = fig
        return original(fig)

    plt.close = keep
    try:
        report.plot(json.loads((workspace / "results.json").read_text()), tmp_path / "p.png", {1: 0.5})
    finally:
        plt.close = original
    top, bottom = captured["fig"].axes
    labels = [t.get_text() for t in top.get_legend().get_texts()]
    assert "best so far" in labels and "test score" in labels
    best_line = [line for line in top.get_lines() if line.get_label() == "best so far"][0]
    assert len(best_line.get_xdata()) >= 2  # a line, not a single dot
    assert "calls" in bottom.get_ylabel() and any(p.get_height() > 0 for p in bottom.patches)


# ---- 9. launch.sh --------------------------------------------------------------------------


def _ray_pids() -> set[int]:
    pids = set()
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if b"raylet" in cmdline or b"gcs_server" in cmdline or b"/ray " in cmdline or b"ray start" in cmdline:
            pids.add(int(pid))
    return pids


def _stub_venv(tmp_path: Path) -> tuple[dict, Path]:
    """A venv whose python and ray only record that they were run: if launch.sh set anything up,
    or called ray, for a help request, the record says so (and no real Ray is ever started)."""
    venv = tmp_path / "venv" / "bin"
    venv.mkdir(parents=True)
    record = tmp_path / "called.txt"
    for name in ("python", "ray", "aflow"):
        (venv / name).write_text(f'#!/bin/sh\necho "{name} $*" >> "{record}"\nexit 1\n')
        (venv / name).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(AFLOW_VENV=str(venv.parent), AFLOW_RUNS_DIR=str(tmp_path / "runs"),
               PATH=f"{venv}{os.pathsep}{env.get('PATH', '')}")
    return env, record


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_launch_help_is_its_own_and_starts_nothing(tmp_path, flag):
    env, record = _stub_venv(tmp_path)
    before = _ray_pids()
    result = subprocess.run(["bash", str(ROOT / "launch.sh"), flag], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("usage: bash launch.sh")
    for mode in ("--dry-run", "--benchmark", "OVERRIDES", "--help | -h"):
        assert mode in result.stdout
    assert "usage: aflow evaluate" not in result.stdout and "results:" not in result.stdout
    assert not record.exists(), record.read_text()  # no set-up, no ray, no aflow
    assert not (tmp_path / "runs").exists()
    assert not (_ray_pids() - before)


def test_launch_evaluate_prints_the_out_it_really_writes(tmp_path, data_dir):
    env = {**os.environ, "AFLOW_VENV": str(Path(sys.executable).parent.parent), "AFLOW_RUNS_DIR": str(tmp_path / "runs")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    result = subprocess.run(["bash", str(ROOT / "launch.sh"), "--benchmark", "gsm8k", "--workflow", "builtin:gold",
                             "--limit", "2", "--data-dir", str(data_dir), "--out", "mine"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    written = tmp_path / "mine" / "results.jsonl"
    assert written.is_file()
    assert result.stdout.strip().splitlines()[-1] == f"results: {written}  summary: {tmp_path / 'mine' / 'summary.json'}"
    assert not (tmp_path / "runs").exists() and not (ROOT / "mine").exists()


def test_launch_dry_run_of_the_cpu_preset_needs_no_gpu(tmp_path):
    env = {**os.environ, "AFLOW_VENV": str(Path(sys.executable).parent.parent), "AFLOW_RUNS_DIR": str(tmp_path / "runs")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.pop("RAY_ADDRESS", None)
    result = subprocess.run(["bash", str(ROOT / "launch.sh"), "--dry-run", "preset=cpu-local"], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    verdict = result.stdout.strip().splitlines()[-1]
    assert verdict == "dry run: config valid; resource plan fits", verdict
    plan_text = result.stdout.split("# resource plan", 1)[1]
    plan = json.loads(plan_text[:plan_text.index("\n}\n") + 2])
    # verl's trainer on the CPU: its one GPU is Ray's logical GPU, mapped to the CPU by the cpu platform
    assert plan["gpus"]["total"] == 1 and "logical" in plan["cluster"]["source"]
    assert "GPU" not in verdict
