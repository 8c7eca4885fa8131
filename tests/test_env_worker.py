"""AFlowWorker actors on a real local Ray cluster, with the real embedded executor."""

from __future__ import annotations

import asyncio
import json
import os
import re
import uuid
from pathlib import Path

import pytest

from agent_system.config import EnvConfig
from agent_system.environments.env_package.aflow.episode import anchor_of
from agent_system.environments.env_package.aflow.manager import AFlowEnvironmentManager
from agent_system.reward import episode_reward, group_diversity_bonus, operators_used
from tests.fake_openai import FakeOpenAI
from tests.samples import GRAPH, action


class Episodes:
    """Rows x group_n episodes over the worker actors, as the agent loop drives them (a row's group
    shares its uid, so they all start from the same state)."""

    def __init__(self, env_config: dict, group_n: int, workdir: str):
        from agent_system.environments.env_package.aflow.worker import route, worker_handle

        self.cfg, self.group_n = EnvConfig.from_dict(env_config), group_n
        self.handle = lambda benchmark, uid: worker_handle(route(self.cfg, benchmark, uid), env_config, workdir)
        self.episodes: list[tuple[object, str]] = []

    async def reset(self, rows: list[dict]) -> list[str]:
        calls = []
        for row in rows:
            worker = self.handle((row.get("extra_info") or {}).get("benchmark", ""), row["uid"])
            for _ in range(self.group_n):
                self.episodes.append((worker, uuid.uuid4().hex))
                calls.append(worker.reset.remote(self.episodes[-1][1], row["uid"], row))
        return [r["observation"] for r in await asyncio.gather(*calls)]

    async def step(self, texts: list[str]):
        results = await asyncio.gather(*(w.step.remote(e, t) for (w, e), t in zip(self.episodes, texts, strict=True)))
        return ([r["observation"] for r in results], [r["reward"] for r in results], [r["done"] for r in results],
                [r["info"] for r in results])

    async def close(self) -> list[dict]:
        return await asyncio.gather(*(w.close.remote(e) for w, e in self.episodes))


def start_graph(observation: str) -> str:
    return observation.split("<graph>", 1)[1].split("</graph>", 1)[0]


def env_dict(server, data_dir, **overrides):
    return {"mode": "task", "max_turns": 2, "eval_subset_size": 2, "feedback_size": 1, "num_workers": 1,
            "executor": {"base_url": server.base_url, "model": server.model, "max_tokens": 48},
            "data_dir": str(data_dir), **overrides}


def test_task_mode_group_shares_its_start_and_merges_afterwards(ray_cluster, embedded_executor, data_dir, tmp_path):
    config = env_dict(embedded_executor, data_dir)
    workdir = str(tmp_path / f"env-{uuid.uuid4().hex[:6]}")

    async def go():
        envs = Episodes(config, group_n=2, workdir=workdir)
        uid = "row-1"
        obs = await envs.reset([{"uid": uid, "extra_info": {"benchmark": "gsm8k"}}])
        assert len(obs) == 2 and obs[0] == obs[1]  # same start state for the whole group
        assert "You improve agentic workflows for the gsm8k benchmark" in obs[0]
        _, rewards, dones, infos = await envs.step([action(1), "not a workflow at all"])
        assert infos[0]["valid"] and not infos[1]["valid"]
        assert "no <graph>" in infos[1]["reason"] and rewards[1] == 0.0
        assert infos[0]["anchor"] == infos[1]["anchor"]  # both acted on the same start workflow
        assert dones == [False, False]
        _, _, dones, infos = await envs.step([action(2), action(3)])
        assert dones == [True, True]
        assert infos[0]["anchor"] != infos[1]["anchor"]  # episode 0 moved on, episode 1 did not
        summaries = await envs.close()
        worker = envs.episodes[0][0]
        tree = await worker.tree_summary.remote("gsm8k")
        # root + the 3 valid workflows, merged only after the episodes closed (in either order: an
        # async actor does not keep the two closes in submission order, so round numbers may swap)
        by_round = {n["round"]: n["modification"] for n in tree}
        edges = sorted((n["modification"], by_round[n["parent"]]) for n in tree if n["parent"])
        assert len(tree) == 4 and edges == [("Answer style 1.", "initial workflow"),
                                            ("Answer style 2.", "Answer style 1."),
                                            ("Answer style 3.", "initial workflow")], tree
        # a new row (another uid) may start from any node; the same uid again starts where it did
        again = Episodes(config, group_n=1, workdir=workdir)
        obs_again = await again.reset([{"uid": uid, "extra_info": {"benchmark": "gsm8k"}}])
        assert start_graph(obs_again[0]) == start_graph(obs[0])
        # its experience line: "improved" exactly when the child scored above its parent (the start), both
        # measured on the child's own sample (the parent's measurement there is one of the root's scores)
        line = re.search(r"- Answer style 1\. \((improved|did not improve): ([0-9.]+) -> ([0-9.]+)\)", obs_again[0])
        assert line, obs_again[0]
        verdict, before, after = line.group(1), float(line.group(2)), float(line.group(3))
        assert after == pytest.approx(next(n["scores"][0] for n in tree if n["modification"] == "Answer style 1."),
                                      abs=1e-4)
        assert any(before == pytest.approx(s, abs=1e-4) for s in next(n["scores"] for n in tree if not n["parent"]))
        assert verdict == ("improved" if after > before else "did not improve")
        await again.close()
        return summaries

    summaries = asyncio.run(go())
    assert [len(s["turns"]) for s in summaries] == [2, 2]
    total, parts = episode_reward(summaries[1], EnvConfig().reward)
    assert parts["format"] == pytest.approx(-0.1)  # one invalid action, default penalty
    assert total == pytest.approx(parts["return"] + parts["format"])


def test_query_mode_scores_the_workflow_on_its_problem(ray_cluster, embedded_executor, data_dir, tmp_path):
    """Through the actor: the row's problem is the one scored, and a workflow that returns the right answer
    as a constant (the policy answering it itself) is credited nothing (tests/test_env_integrity.py has the
    honest counterpart, which earns the score)."""
    config = env_dict(embedded_executor, data_dir, mode="query", max_turns=2)
    row = {"uid": "q-1", "extra_info": {"benchmark": "gsm8k", "index": 0, "problem_id": "x",
                                         "inputs": '{"problem": "What is 3 + 4?"}'},
           "reward_model": {"style": "rule", "ground_truth": '{"answer": "7"}'}}
    gold_graph = GRAPH.replace('return result["response"]', 'return "7"')

    async def go():
        envs = Episodes(config, group_n=1, workdir=str(tmp_path / "q"))
        obs = await envs.reset([row])
        assert "What is 3 + 4?" in obs[0]
        _, rewards, dones, infos = await envs.step(["<modification>x</modification><graph>oops</graph>"])
        assert not infos[0]["valid"] and dones == [False]
        text = f"<modification>Return 7.</modification><graph>{gold_graph}</graph><prompt>STYLE = ''</prompt>"
        _, rewards, dones, infos = await envs.step([text])
        await envs.close()
        return rewards, dones, infos

    rewards, dones, infos = asyncio.run(go())
    assert rewards == [0.0] and dones == [True] and infos[0]["valid"] and infos[0]["score"] == 0.0


def test_manager_keeps_a_bounded_history():
    manager = AFlowEnvironmentManager(history_length=2)
    for i in range(4):
        manager.record(action(i), 0.1 * i, {"valid": True})
    text = manager.user_message("OBS")["content"]
    assert "Answer style 3." in text and "Answer style 2." in text and "Answer style 1." not in text
    assert text.endswith("OBS")


def test_reward_shaping_terms():
    from agent_system.config import RewardConfig

    summary = {"mode": "task", "cost_usd": 0.5, "tokens": 1500,
               "final_graph": GRAPH.replace("Custom", "Custom, ScEnsemble", 1),
               "turns": [{"valid": True, "reward": 0.2}, {"valid": False, "reward": 0.0}]}
    total, parts = episode_reward(summary, RewardConfig(format_penalty=0.1, cost_penalty=0.2, variety_weight=0.05,
                                                        token_penalty=0.02))
    assert parts == pytest.approx({"return": 0.2, "format": -0.1, "cost": -0.1, "tokens": -0.03, "variety": 0.1})
    assert total == pytest.approx(0.07)
    assert operators_used(GRAPH) == {"Custom"}
    bonus = group_diversity_bonus([frozenset({"Custom"}), frozenset({"Custom", "ScEnsemble"}), frozenset({"A"})],
                                  ["u", "u", "v"], weight=1.0)
    assert bonus == pytest.approx([0.5, 0.5, 0.0])
    assert anchor_of("a  b\n", "p") == anchor_of("a b", "p ")


@pytest.mark.parametrize("verdict,expected", [("yes", 1.0), ("no", None)])
def test_llm_judge_can_raise_a_qa_score(fake_openai, verdict, expected, tmp_path, monkeypatch):
    """Query mode on a QA benchmark: the judge (a real local HTTP endpoint) sees question,
    references and answer; its yes lifts a lexical F1 that missed a paraphrase the executor wrote."""
    from aflow.benchmarks import Problem, get_benchmark
    from aflow.config import LLMConfig
    from aflow.llm import LLMClient
    from aflow.sandbox import Sandbox
    from agent_system.config import EndpointConfig
    from agent_system.environments.env_package.aflow.measure import Meter
    from agent_system.environments.env_package.aflow.spaces import query_episode
    from agent_system.reward import make_judge

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # a fresh response cache for this verdict
    fake_openai.reply = lambda messages: (verdict if "Reference answer(s)" in messages[0]["content"]
                                          else "the novelist Eric Blair")
    problem = Problem(id="h1", inputs={"problem": "Who wrote Animal Farm?"},
                      reference={"answers": ["George Orwell (Eric Blair)"]})

    async def go():
        llm = LLMClient(LLMConfig(base_url=fake_openai.base_url, model="exe", cache=False))
        judge = make_judge(EndpointConfig(base_url=fake_openai.base_url, model="judge"))
        bench = get_benchmark("hotpotqa")
        async with Sandbox() as sandbox:
            episode = query_episode("code", bench, problem, "builtin:io", Meter(bench, llm, sandbox, {}), judge=judge)
            _, reward, done, info = await episode.step(
                f"<modification>x</modification><graph>{GRAPH}</graph><prompt>STYLE = ''</prompt>")
        await llm.close()
        await judge.client.close()
        return reward, done

    reward, done = asyncio.run(go())
    lexical = 2 * (2 / 3 * 2 / 4) / (2 / 3 + 2 / 4)  # "eric blair" shared: precision 2/3... of normalized tokens
    assert done
    judged = [r for r in fake_openai.chat_requests if "Reference answer(s)" in r.body["messages"][0]["content"]]
    assert len(judged) == 1 and "George Orwell (Eric Blair)" in judged[0].body["messages"][0]["content"]
    if expected is None:  # the judge's no leaves the lexical F1 (4/7) as it is
        assert reward == pytest.approx(lexical) == 4 / 7
    else:
        assert reward == expected


# ---- one worker's load and its validation state (in-process AFlowWorker, a real local server) ----

def _worker(fake, data_dir, tmp_path, **overrides):
    from agent_system.environments.env_package.aflow.worker import AFlowWorker

    config = {"mode": "task", "max_turns": 1, "eval_subset_size": 6, "num_workers": 1,
              "executor": {"base_url": fake.base_url, "model": "fake-model", "max_tokens": 32},
              "data_dir": str(data_dir), **overrides}
    return AFlowWorker(config, str(tmp_path / "env"))


def zygotes_of_this_process() -> list[int]:
    """Live sandbox zygotes this process started (read from /proc, not from the worker's fields)."""
    from aflow.sandbox import _children

    found = []
    for pid in _children(os.getpid()):
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if state != "Z" and b"--zygote" in cmdline:
            found.append(pid)
    return found


def test_env_concurrency_bounds_the_problems_a_worker_runs_at_once(data_dir, tmp_path):
    """Issue 13, defect 6: env.concurrency was read nowhere, so one task-mode worker ran
    episodes x eval_subset_size problems (sandboxes and executor calls) at once."""
    with FakeOpenAI(latency=0.3) as fake:
        worker = _worker(fake, data_dir, tmp_path, concurrency=2)

        async def go():
            rows = [{"extra_info": {"benchmark": "gsm8k", "split": "validate"}} for _ in range(3)]
            await asyncio.gather(*(worker.reset(f"e{i}", f"uid-{i}", row) for i, row in enumerate(rows)))
            # concurrent first resets once started a zygote each and kept one: the others ran until the actor died
            zygotes = zygotes_of_this_process()
            await asyncio.gather(*(worker.step(f"e{i}", action(i)) for i in range(3)))  # 3 x 6 problems
            await asyncio.gather(*(worker.close(f"e{i}") for i in range(3)))
            await worker.shutdown()
            return zygotes, zygotes_of_this_process()

        (during, after) = asyncio.run(go())
        calls, peak = fake.count, fake.max_in_flight
    assert calls >= 6 * 4  # the root's 6 problems, then 3 episodes x 6
    assert peak == 2, peak
    assert len(during) == 1 and after == [], (during, after)


def test_validation_rows_score_the_test_split_and_never_touch_the_training_tree(data_dir, tmp_path):
    """Issue 13, defect 5: task-mode validation scored the training (validate) split and merged its
    episodes into the training search tree."""
    with FakeOpenAI() as fake:
        worker = _worker(fake, data_dir, tmp_path, eval_subset_size=2)

        async def go():
            train = {"extra_info": {"benchmark": "gsm8k", "split": "validate"}}
            val = {"extra_info": {"benchmark": "gsm8k", "split": "test"}}
            await worker.reset("t", "uid-t", train)
            await worker.step("t", action(1))
            await worker.close("t")
            await worker.reset("v", "uid-v", val)
            await worker.step("v", action(2))
            await worker.close("v")
            trees = await worker.tree_summary("gsm8k"), await worker.tree_summary("gsm8k", "test")
            problems = {split: {p.id for p in state.draws.feedback + state.draws.pool}
                        for (_, split), state in worker.tasks.items()}
            await worker.shutdown()
            return trees, problems

        (train_tree, val_tree), problems = asyncio.run(go())
    assert len(train_tree) == 2  # root + the training episode's workflow
    assert len(val_tree) == 1  # root only: the validation episode was not merged anywhere
    test_ids = {json.loads(line)["id"] for line in (data_dir / "gsm8k_test.jsonl").read_text().splitlines()}
    validate_ids = {json.loads(line)["id"] for line in (data_dir / "gsm8k_validate.jsonl").read_text().splitlines()}
    assert problems == {"validate": validate_ids, "test": test_ids}
