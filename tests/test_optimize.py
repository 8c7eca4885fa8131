"""`aflow optimize` end to end: a real process, a real local HTTP optimizer/executor, real files."""

import hashlib
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from multiprocessing import Pool

import pytest

from aflow.search.experience import Experience, ExperiencePool
from tests.fake_openai import FakeOpenAI

GRAPH = """from aflow_ops import Custom
import prompt


class Workflow:
    def __init__(self):
        self.custom = Custom()

    async def __call__(self, problem):
        result = await self.custom(input=problem, instruction=prompt.STYLE_{n})
        return result["response"]
"""


def gold_answers(data_dir):
    answers = {}
    for split in ("validate", "test"):
        for line in (data_dir / f"gsm8k_{split}.jsonl").read_text().splitlines():
            row = json.loads(line)
            answers[row["question"]] = row["answer"]
    return answers


def scripted_reply(answers=None):
    """Optimizer requests get a new valid modification each time; executor requests the gold
    answer when `answers` knows the question (else 36)."""
    counter = itertools.count(1)
    answers = answers or {}

    def reply(messages):
        text = messages[0]["content"]
        if "You improve agentic workflows" in text:
            n = next(counter)
            return (f"<modification>Use answer style {n}.</modification>\n<graph>\n{GRAPH.format(n=n)}</graph>\n"
                    f"<prompt>\nSTYLE_{n} = 'Answer in style {n}. End with the number.'\n</prompt>")
        known = [a for q, a in answers.items() if q in text]
        return f"The answer is {known[0] if known else 36}"

    return reply


def optimize(workspace, server, *extra, data_dir, timeout=300):
    args = [sys.executable, "-m", "aflow.cli", "optimize", "--benchmark", "gsm8k", "--workspace", str(workspace),
            "--limit", "3", "--validation-rounds", "1", "--data-dir", str(data_dir),
            "--optimizer-base-url", server.base_url, "--optimizer-model", "opt",
            "--executor-base-url", server.base_url, "--executor-model", "exe", "--json", *extra]
    return args


def tree_hashes(workspace, rounds):
    out = {}
    for r in rounds:
        for path in sorted((workspace / f"round_{r}").iterdir()):
            out[str(path.relative_to(workspace))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def test_kill_9_after_round_2_then_resume(tmp_path, data_dir):
    workspace = tmp_path / "ws"
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    with FakeOpenAI(latency=0.3, reply=scripted_reply()) as server:
        process = subprocess.Popen(optimize(workspace, server, "--rounds", "6", data_dir=data_dir),
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        deadline = time.monotonic() + 240
        while not (workspace / "round_2" / "scores.json").exists():
            assert process.poll() is None, process.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "round 2 never finished"
            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
        before = tree_hashes(workspace, [1, 2])
        assert not (workspace / "round_4" / "scores.json").exists()
        # rounds 1 and 2 finished; round 3 may have finished too before the kill landed
        done = sorted(int(path.parent.name.split("_")[1]) for path in workspace.glob("round_*/scores.json"))
        assert done in ([1, 2], [1, 2, 3])

        resumed = subprocess.run(optimize(workspace, server, "--rounds", "4", "--resume", data_dir=data_dir),
                                 capture_output=True, text=True, env=env, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    result = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert result["rounds_done"] == 4
    for key in ("best_round", "best_validation_score", "test_score", "total_cost_usd", "calls", "wall_s"):
        assert key in result
    assert tree_hashes(workspace, [1, 2]) == before  # completed rounds untouched, byte for byte
    for r in (3, 4):
        scores = json.loads((workspace / f"round_{r}" / "scores.json").read_text())
        assert scores["status"] == "evaluated" and len(scores["scores"]) == 1
    results = json.loads((workspace / "results.json").read_text())
    assert [r["round"] for r in results["rounds"]] == [1, 2, 3, 4]
    assert f"resume: {len(done)} round(s) done, continuing at round {done[-1] + 1} of 4" in resumed.stderr
    experience = [json.loads(line) for line in (workspace / "experience.jsonl").read_text().splitlines()]
    assert [e["child"] for e in experience] == [2, 3, 4]
    assert len({e["modification"] for e in experience}) == 3


def test_test_split_report_and_plot(tmp_path, data_dir):
    with FakeOpenAI(reply=scripted_reply(gold_answers(data_dir))) as server:
        run = subprocess.run(optimize(tmp_path / "ws", server, "--rounds", "3", "--test", "--test-limit", "4",
                                      "--cache-path", str(tmp_path / "c.sqlite"), data_dir=data_dir),
                             capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["test_score"] == 1.0 and result["best_validation_score"] == 1.0
    test_scores = json.loads((tmp_path / "ws" / "test_scores.json").read_text())
    assert len(test_scores) == 3
    report = (tmp_path / "ws" / "report.md").read_text()
    assert "| round | parent |" in report and "plot.png" in report
    png = (tmp_path / "ws" / "plot.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_unreachable_optimizer_is_one_line_and_keeps_rounds(tmp_path, data_dir):
    workspace = tmp_path / "ws"
    with FakeOpenAI(reply=scripted_reply()) as server:
        first = subprocess.run(optimize(workspace, server, "--rounds", "2", data_dir=data_dir),
                               capture_output=True, text=True, timeout=300)
        assert first.returncode == 0, first.stderr[-2000:]
        before = tree_hashes(workspace, [1, 2])
        dead = [sys.executable, "-m", "aflow.cli", "optimize", "--benchmark", "gsm8k", "--workspace", str(workspace),
                "--limit", "3", "--validation-rounds", "1", "--data-dir", str(data_dir), "--rounds", "4", "--resume",
                "--optimizer-base-url", "http://127.0.0.1:9/v1", "--optimizer-model", "opt",
                "--executor-base-url", server.base_url, "--executor-model", "exe"]
        result = subprocess.run(dead, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert "optimizer http://127.0.0.1:9/v1 is not reachable" in result.stderr
    assert tree_hashes(workspace, [1, 2]) == before
    assert not (workspace / "round_3").exists()


def test_garbage_from_the_optimizer_is_a_rejected_round(tmp_path, data_dir):
    with FakeOpenAI(reply=lambda m: "<modification>x</modification><graph>def broken(:</graph>"
                    if "You improve" in m[0]["content"] else "The answer is 36") as server:
        run = subprocess.run(optimize(tmp_path / "ws", server, "--rounds", "2", "--max-retries", "2",
                                      data_dir=data_dir), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    scores = json.loads((tmp_path / "ws" / "round_2" / "scores.json").read_text())
    assert scores["status"] == "rejected" and len(scores["reasons"]) == 2
    assert all("static checks" in r for r in scores["reasons"])
    lines = (tmp_path / "ws" / "expansions.jsonl").read_text().splitlines()
    assert len(lines) == 2 and not json.loads(lines[0])["valid"]


def _write_experience(args):
    path, worker = args
    pool = ExperiencePool(path, scope="shared")
    for i in range(25):
        pool.add(Experience(parent=1, child=worker * 100 + i, modification=f"w{worker}-{i}",
                            score_before=0.5, score_after=0.5 + i / 100))
    return worker


def test_experience_pool_is_safe_across_processes(tmp_path):
    path = tmp_path / "experience.sqlite"
    with Pool(4) as pool:
        assert sorted(pool.map(_write_experience, [(path, w) for w in range(4)])) == [0, 1, 2, 3]
    records = ExperiencePool(path, scope="shared").all()
    assert len(records) == 100
    assert ExperiencePool(path, scope="other").all() == []
    assert ExperiencePool(path, scope="shared").mean_improvement(1) == pytest.approx(0.12)


@pytest.mark.model  # `aflow optimize` starts the embedded executor
def test_two_rounds_with_the_embedded_model_write_the_whole_workspace(tmp_path, data_dir):
    workspace = tmp_path / "ws"
    run = subprocess.run([sys.executable, "-m", "aflow.cli", "optimize", "--benchmark", "gsm8k",
                          "--workspace", str(workspace), "--rounds", "2", "--validation-rounds", "1",
                          "--limit", "2", "--data-dir", str(data_dir), "--max-retries", "1",
                          # a workflow in far fewer than 1,024 tokens, or none: SmolLM2 on a shared CPU
                          "--optimizer-max-tokens", "256", "--executor-max-tokens", "64",
                          "--cache-path", str(tmp_path / "c.sqlite"), "--json"],
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["rounds_done"] == 2 and result["calls"] > 0
    for name in ("config.json", "results.json", "experience.jsonl", "expansions.jsonl",
                 "round_1/graph.py", "round_1/prompt.py", "round_1/log.jsonl", "round_1/scores.json",
                 "round_2/scores.json"):
        assert (workspace / name).is_file(), name
    assert len((workspace / "round_1" / "log.jsonl").read_text().splitlines()) == 2
    round_2 = json.loads((workspace / "round_2" / "scores.json").read_text())
    # SmolLM2 rarely writes a valid workflow: the round is what its recorded answers made it
    attempts = [e for e in map(json.loads, (workspace / "expansions.jsonl").read_text().splitlines()) if e["round"] == 2]
    assert [e["attempt"] for e in attempts] == [1]  # --max-retries 1: one optimizer answer per round
    if attempts[-1]["valid"]:
        assert round_2["status"] == "evaluated" and len(round_2["scores"]) == 1
        assert (workspace / "round_2" / "graph.py").is_file()
    else:  # the answer was rejected, for the reason recorded
        assert round_2["status"] == "rejected"
        assert round_2["reasons"] == [e["reason"] for e in attempts]


def test_optimizer_and_executor_max_tokens_cap_each_roles_answers(tmp_path, data_dir):
    with FakeOpenAI(reply=scripted_reply()) as server:
        run = subprocess.run(optimize(tmp_path / "ws", server, "--rounds", "2", "--optimizer-max-tokens", "77",
                                      "--executor-max-tokens", "33", data_dir=data_dir),
                             capture_output=True, text=True, timeout=300)
        bodies = [r.body for r in server.chat_requests if r.body.get("max_tokens", 0) > 1]  # not the 1-token probes
    assert run.returncode == 0, run.stderr[-2000:]
    by_model = {model: {b["max_tokens"] for b in bodies if b["model"] == model} for model in ("opt", "exe")}
    assert by_model == {"opt": {77}, "exe": {33}}


def test_search_stops_when_the_top_scores_converge(tmp_path, data_dir):
    """Every modification scores the same: after `convergence-rounds` flat rounds the search stops."""
    with FakeOpenAI(reply=scripted_reply()) as server:
        run = subprocess.run(optimize(tmp_path / "ws", server, "--rounds", "10", "--convergence-rounds", "2",
                                      data_dir=data_dir), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["converged"] is True and result["rounds_done"] == 3
    assert "converged" in run.stderr


@pytest.mark.parametrize("provider", ["model", "empirical"])
def test_value_providers_feed_selection(tmp_path, data_dir, provider):
    inner = scripted_reply()

    def reply(messages):
        if "How likely is it that one modification" in messages[0]["content"]:
            return "0.9"
        return inner(messages)

    with FakeOpenAI(reply=reply) as server:
        run = subprocess.run(optimize(tmp_path / "ws", server, "--rounds", "3", "--value-provider", provider,
                                      "--value-weight", "0.5", data_dir=data_dir),
                             capture_output=True, text=True, timeout=300)
        value_calls = [r for r in server.chat_requests if "How likely" in r.body["messages"][0]["content"]]
    assert run.returncode == 0, run.stderr[-2000:]
    selections = [json.loads(line)["selection"] for line in (tmp_path / "ws" / "expansions.jsonl").read_text().splitlines()]
    assert all(s["values"] for s in selections)
    if provider == "model":
        assert selections[0]["values"] == [0.9] and len(value_calls) == 2  # one per node, cached after
    else:
        assert not value_calls and selections[-1]["values"][0] == 0.5  # root's child did not improve: 0.5 + 0
