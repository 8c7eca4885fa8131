"""`aflow optimize --action-space canvas` end to end: a real process, a real local OpenAI-compatible
server (tests/fake_openai.py) as executor and optimizer with scripted canvas edits, real round files.

What is checked: round files are the compiled canvases (an ordinary native workflow each); the
optimizer reads exactly `canvas_optimizer_prompt(...)` for the parent it expands; an invalid answer,
FINISH and an edit giving a canvas already tried from the same parent are rejected and retried with
the reason; a canvas workspace resumes, and refuses a resume in the code action space."""

from __future__ import annotations

import json
import statistics

import pytest

from aflow.canvas import canvas_of, compile_canvas, initial, replay
from aflow.search.experience import Experience
from aflow.search.optimizer import FINISH_REASON, InitialWorkflowError, initial_workflow
from aflow.search.prompts import canvas_optimizer_prompt
from aflow.search.workspace import Workspace
from aflow.workflows import load_workflow
from tests.fake_openai import FakeOpenAI
from tests.test_optimize import gold_answers
from tests.test_optimize_trust import optimize, run

OPTIMIZER_MARK = "by editing the workflow"  # in the canvas optimizer prompt only
WRONG = "Be wrong."  # a step prompt the executor answers wrongly: its round scores 0


def canvas_search(workspace, server, *extra, data_dir):
    return optimize(workspace, server, "--action-space", "canvas", *extra, data_dir=data_dir)


def reply_with(answers, edits):
    """Optimizer: the scripted edits in turn (FINISH once they run out); executor: the gold answer,
    or a wrong one when the workflow's prompt says WRONG."""
    scripted = iter(edits)

    def reply(messages):
        text = messages[0]["content"]
        if OPTIMIZER_MARK in text:
            return next(scripted, "FINISH")
        known = [a for q, a in answers.items() if q in text and WRONG not in text]
        return f"The answer is {known[0] if known else -1}"

    return reply


def optimizer_requests(server) -> list[list[dict]]:
    return [r.body["messages"] for r in server.chat_requests if OPTIMIZER_MARK in r.body["messages"][0]["content"]]


def read_round(workspace, number) -> dict:
    return json.loads((workspace / f"round_{number}" / "scores.json").read_text())


def round_canvas(workspace, number):
    directory = workspace / f"round_{number}"
    return canvas_of((directory / "graph.py").read_text(), (directory / "prompt.py").read_text())


def expected_prompt(workspace, parent: int, before: int) -> str:
    """What the optimizer must read when round `before` expands round `parent`, rebuilt from the files."""
    scores = read_round(workspace, parent)
    experience = [Experience(**{k: e[k] for k in ("parent", "child", "modification", "score_before", "score_after")})
                  for e in map(json.loads, (workspace / "experience.jsonl").read_text().splitlines())
                  if e["parent"] == parent and e["child"] < before]
    return canvas_optimizer_prompt("gsm8k", round_canvas(workspace, parent), statistics.fmean(scores["scores"]),
                                   experience, Workspace(workspace).failures(parent))


def expansions(workspace) -> list[dict]:
    return [json.loads(line) for line in (workspace / "expansions.jsonl").read_text().splitlines()]


def test_canvas_search_records_compiled_canvases_and_resumes(tmp_path, data_dir):
    workspace = tmp_path / "ws"
    with FakeOpenAI(reply=reply_with(gold_answers(data_dir), ["ENSEMBLE 1 3", "ADD REVIEW", "ADD FORMAT"])) as server:
        first = run(canvas_search(workspace, server, "--rounds", "3", data_dir=data_dir))
        requests = optimizer_requests(server)
        assert first.returncode == 0, first.stderr[-3000:]

        # round 1 is the initial canvas; each later round is its parent's canvas after the action line
        assert round_canvas(workspace, 1) == initial(False)
        assert read_round(workspace, 2)["modification"] == "ENSEMBLE 1 3"
        assert round_canvas(workspace, 2) == replay(initial(False), ["ENSEMBLE 1 3"])
        for number in (2, 3):
            scores = read_round(workspace, number)
            child = replay(round_canvas(workspace, scores["parent"]), [scores["modification"]])
            graph, prompt = compile_canvas(child, "gsm8k")
            assert (workspace / f"round_{number}" / "graph.py").read_text() == graph
            assert (workspace / f"round_{number}" / "prompt.py").read_text() == prompt
            assert load_workflow(str(workspace / f"round_{number}")).format == "native"  # an ordinary workflow
        assert read_round(workspace, 3)["modification"] == "ADD REVIEW"

        # the optimizer read exactly the shared canvas prompt of the parent it expanded, once per round
        rounds = expansions(workspace)
        assert [e["round"] for e in rounds] == [2, 3] and len(requests) == 2
        for entry, messages in zip(rounds, requests, strict=True):
            assert messages == [{"role": "user", "content": expected_prompt(workspace, entry["parent"], entry["round"])}]
        results = json.loads((workspace / "results.json").read_text())
        assert [r["round"] for r in results["rounds"]] == [1, 2, 3]
        assert json.loads((workspace / "config.json").read_text())["action_space"] == "canvas"

        refused = run(optimize(workspace, server, "--rounds", "4", "--resume", data_dir=data_dir))
        assert refused.returncode == 2, refused.stderr[-2000:]
        assert refused.stderr.strip().splitlines() == [refused.stderr.strip()]
        assert "action_space (workspace: canvas, now: code)" in refused.stderr
        assert not (workspace / "round_4").exists()

        resumed = run(canvas_search(workspace, server, "--rounds", "4", "--resume", data_dir=data_dir))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resume: 3 round(s) done" in resumed.stderr
    scores = read_round(workspace, 4)
    assert scores["status"] == "evaluated" and scores["modification"] == "ADD FORMAT"
    assert round_canvas(workspace, 4) == replay(round_canvas(workspace, scores["parent"]), ["ADD FORMAT"])
    # a round of a canvas search is a canvas: a new canvas search may start from it
    seed = initial_workflow("gsm8k", str(workspace / "round_4"), "canvas")
    assert canvas_of(seed.graph, seed.prompt) == round_canvas(workspace, 4)


def test_rejected_edits_are_retried_with_the_reason(tmp_path, data_dir):
    """UCB selection is deterministic: round 2 (WRONG prompt) scores 0, so round 3 expands round 1 again,
    where re-proposing round 2's edit is an already-tried canvas."""
    workspace = tmp_path / "ws"
    wrong = f'SET_PROMPT 1 "{WRONG}"'
    edits = ["make it better", wrong, wrong, "FINISH", "ENSEMBLE 1 2"]
    with FakeOpenAI(reply=reply_with(gold_answers(data_dir), edits)) as server:
        result = run(canvas_search(workspace, server, "--rounds", "3", "--selection", "ucb", data_dir=data_dir))
        requests = optimizer_requests(server)
    assert result.returncode == 0, result.stderr[-3000:]
    attempts = expansions(workspace)
    assert [(e["round"], e["parent"], e["valid"]) for e in attempts] == [
        (2, 1, False), (2, 1, True), (3, 1, False), (3, 1, False), (3, 1, True)]
    assert "unknown action 'make'" in attempts[0]["reason"]
    assert attempts[2]["reason"] == "this edit gives a workflow already tried from this one"
    assert attempts[3]["reason"] == FINISH_REASON
    # each retry repeats the prompt and adds the last reason
    for previous, messages in zip(attempts, requests[1:], strict=False):
        if previous["valid"]:
            assert len(messages) == 1
        else:
            assert len(messages) == 2 and previous["reason"] in messages[1]["content"]
    assert requests[2][0]["content"] == expected_prompt(workspace, 1, 3)  # round 2's edit listed as tried
    assert wrong in requests[2][0]["content"].split("Edits already tried")[1]
    assert read_round(workspace, 2)["mean"] == 0 and read_round(workspace, 1)["mean"] == 1
    assert read_round(workspace, 3)["modification"] == "ENSEMBLE 1 2"


def test_bad_action_space_and_initial_workflow_are_one_line(tmp_path, data_dir):
    with FakeOpenAI() as server:
        bogus = run(optimize(tmp_path / "a", server, "--action-space", "bogus", data_dir=data_dir), timeout=120)
        not_canvas = run(canvas_search(tmp_path / "b", server, "--initial-workflow", "builtin:cot",
                                       data_dir=data_dir), timeout=120)
        assert server.count == 0
    for result, words in ((bogus, "--action-space: invalid choice: 'bogus'"), (not_canvas, "is not a compiled canvas")):
        assert result.returncode == 2, result.stderr[-2000:]
        assert result.stderr.strip().splitlines() == [result.stderr.strip()]
        assert words in result.stderr
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_initial_canvas_must_match_the_benchmark_family(tmp_path):
    directory = tmp_path / "code_canvas"
    directory.mkdir()
    graph, prompt = compile_canvas(initial(True), True)
    (directory / "graph.py").write_text(graph)
    (directory / "prompt.py").write_text(prompt)
    assert initial_workflow("humaneval", str(directory), "canvas").graph == graph
    with pytest.raises(InitialWorkflowError, match="for code benchmarks, not for gsm8k"):
        initial_workflow("gsm8k", str(directory), "canvas")
