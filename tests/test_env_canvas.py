"""The canvas action space of the environment (env.action_space=canvas), task and query mode.

In-process AFlowWorker and Episode objects in the real sandbox, with a real local OpenAI-compatible
server (tests/fake_openai.py) as the executor; one slow test drives Ray actors with the real
embedded executor. Task mode runs on a 6-problem split (tests.samples.small_split): 2 feedback
problems and a scoring pool of 4 that every step's sample covers. The fake executor answers two of
the pool right, and every problem right when the prompt asks to solve "carefully", so an edit's
score change is known.
"""

from __future__ import annotations

import asyncio
import random
import string

import pytest

from aflow import canvas as cv
from agent_system.config import EnvConfig
from agent_system.environments.env_package.aflow.canvas_episode import CanvasEpisode
from agent_system.reward import episode_reward, operators_used
from tests.fake_openai import FakeOpenAI
from tests.samples import operator_reply, small_split
from tests.test_canvas import GRAMMAR, needs_linux, random_accepted

pytestmark = needs_linux

CAREFUL = 'SET_PROMPT 1 "Solve it carefully."'


def gsm8k_problems(data_dir, n: int):
    from aflow.benchmarks import get_benchmark

    return get_benchmark("gsm8k").load("validate", data_dir, n)


def pool_halves(data_dir):
    """The small split's scoring pool as the worker cuts it (default seed), split in two halves."""
    from agent_system.environments.env_package.aflow.draws import Draws

    pool = Draws(gsm8k_problems(data_dir, 6), 4, 2, EnvConfig().seed).pool
    return pool[:2], pool[2:]


def scripted(problems, right=None):
    """Executor replies that depend on the operator template, the problem and the word "carefully":
    right for the problems in `right` (default: the first of `problems`), else only "carefully"."""
    right_ids = {p.id for p in (right if right is not None else problems[:1])}

    def answer_for(content: str) -> str:
        for problem in problems:
            if problem.inputs["problem"][:80] in content:
                return problem.gold if problem.id in right_ids or "carefully" in content else "-1"
        return "0"

    def reply(messages):
        content = messages[-1]["content"]
        routed = operator_reply(content, answer_for(content))
        if routed is not None:
            return routed
        return f"<thought>steps</thought><answer>{answer_for(content)}</answer>"

    return reply


def worker_of(fake, data_dir, tmp_path, **overrides):
    """A canvas worker on the small split (task mode) with the fake executor."""
    from agent_system.environments.env_package.aflow.worker import AFlowWorker

    config = {"mode": "task", "action_space": "canvas", "max_turns": 4, "eval_subset_size": 4, "feedback_size": 2,
              "num_workers": 1, "executor": {"base_url": fake.base_url, "model": "fake-model", "max_tokens": 32},
              "data_dir": str(small_split(data_dir, tmp_path / "data")), **overrides}
    return AFlowWorker(config, str(tmp_path / "env"))


def task_script(data_dir):
    """Half the pool right, the feedback problems wrong: the start scores 0.5, "carefully" 1.0."""
    right, _ = pool_halves(data_dir)
    return scripted(gsm8k_problems(data_dir, 6), right)


def query_row(problem) -> dict:
    import json

    return {"extra_info": {"benchmark": "gsm8k", "index": 0, "problem_id": problem.id,
                           "inputs": json.dumps(problem.inputs)},
            "reward_model": {"style": "rule", "ground_truth": json.dumps(problem.reference)}}


def test_action_space_is_validated():
    assert EnvConfig.from_dict({}).action_space == "code"
    assert EnvConfig.from_dict({"action_space": "canvas"}).action_space == "canvas"
    with pytest.raises(ValueError, match="env.action_space must be 'code' or 'canvas', not 'dsl'"):
        EnvConfig.from_dict({"action_space": "dsl"})


# ---- task mode -----------------------------------------------------------------------------------

def test_task_mode_scores_edits_finishes_and_rejects_with_reasons(data_dir, tmp_path):
    with FakeOpenAI() as fake:
        fake.reply = task_script(data_dir)
        worker = worker_of(fake, data_dir, tmp_path)

        async def go():
            first = await worker.reset("e", "uid-1", {"extra_info": {"benchmark": "gsm8k"}})
            steps = [await worker.step("e", text) for text in ("MAKE IT BETTER", CAREFUL, CAREFUL, "FINISH")]
            summary = await worker.close("e")
            tree = worker.tasks[("gsm8k", "validate")].tree
            await worker.shutdown()
            return first, steps, summary, tree

        first, steps, summary, tree = asyncio.run(go())
    start = cv.initial(False)
    edited = cv.replay(start, [CAREFUL])
    assert "by editing the workflow" in first["observation"] and cv.render(start) in first["observation"]
    assert "validation score 0.5000" in first["observation"]  # the root: the compiled initial canvas, scored
    bad, good, same, finish = steps
    assert not bad["info"]["valid"] and bad["reward"] == 0.0 and not bad["done"] and bad["info"]["reason"]
    assert bad["info"]["reason"] in bad["observation"]
    assert good["info"]["valid"] and good["info"]["score"] == 1.0 and good["reward"] == pytest.approx(0.5)
    assert cv.render(edited) in good["observation"] and "change +0.5000" in good["observation"]
    assert not same["info"]["valid"] and "unchanged" in same["info"]["reason"]
    assert finish["info"]["valid"] and finish["reward"] == 0.0 and finish["done"] and finish["observation"] == ""
    anchors = [s["info"]["anchor"] for s in steps]
    assert anchors[0] == anchors[1] == cv.anchor(start)  # both acted on the start canvas
    assert anchors[2] == anchors[3] == cv.anchor(edited)
    assert [t["modification"] for t in summary["turns"]] == ["", CAREFUL, CAREFUL, "FINISH"]
    final = cv.compile_canvas(edited, False)
    assert summary["final_graph"] == final[0] and operators_used(summary["final_graph"]) == {"AnswerGenerate"}
    total, parts = episode_reward(summary, EnvConfig().reward)
    assert parts["return"] == pytest.approx(0.5) and parts["format"] == pytest.approx(-0.2)
    # merged: the root and the one scored edit, each a canvas node whose files give its canvas back
    assert sorted(tree.nodes) == [1, 2] and tree.nodes[2].modification == CAREFUL
    assert cv.canvas_of(tree.nodes[1].graph, tree.nodes[1].prompt) == start
    assert cv.canvas_of(tree.nodes[2].graph, tree.nodes[2].prompt) == edited


def test_already_tried_is_exact_and_later_episodes_see_the_experience(data_dir, tmp_path):
    with FakeOpenAI() as fake:
        fake.reply = task_script(data_dir)
        worker = worker_of(fake, data_dir, tmp_path, max_turns=3)
        row = {"extra_info": {"benchmark": "gsm8k"}}

        async def go():
            await worker.reset("a", "uid-a", row)
            first = [await worker.step("a", t) for t in ("ADD REVIEW", "DELETE 2", "ENSEMBLE 1 3")]
            await worker.close("a")
            again = await worker.reset("b", "uid-a", row)  # the same row starts where it did: the root
            second = [await worker.step("b", t) for t in ("ADD REVIEW AFTER 1", "ADD REVIEW", "ENSEMBLE 1 3")]
            await worker.close("b")
            state = worker.tasks[("gsm8k", "validate")]
            nodes = {n: (node.parent, cv.canvas_of(node.graph, node.prompt)) for n, node in state.tree.nodes.items()}
            experience = [(e.parent, e.modification) for e in state.pool.all()]
            await worker.shutdown()
            return first, again, second, nodes, experience, state.pool.scope, worker.run_id

        first, again, second, nodes, experience, scope, run_id = asyncio.run(go())
    assert [s["info"]["valid"] for s in first] == [True, False, True]
    assert "already tried" in first[1]["info"]["reason"]  # back to the start canvas: it was this episode's own
    assert "ADD REVIEW (did not improve" in again["observation"]  # the experience of the root, in the prompt
    assert [s["info"]["valid"] for s in second] == [False, False, True]
    assert all("already tried" in s["info"]["reason"] for s in second[:2])  # another spelling, the same canvas
    start = cv.initial(False)
    assert nodes == {1: (None, start), 2: (1, cv.replay(start, ["ADD REVIEW"])),
                     3: (2, cv.replay(start, ["ADD REVIEW", "ENSEMBLE 1 3"])), 4: (1, cv.replay(start, ["ENSEMBLE 1 3"]))}
    assert experience == [(1, "ADD REVIEW"), (2, "ENSEMBLE 1 3"), (1, "ENSEMBLE 1 3")]
    assert scope == f"{run_id}/gsm8k/canvas"  # this run's, never mixed with a code-space search's records


# ---- query mode ----------------------------------------------------------------------------------

AFLOW_ENSEMBLE_GRAPH = '''from typing import Literal
import workspace.GSM8K.workflows.template.operator as operator
import workspace.GSM8K.workflows.round_4.prompt as prompt_custom
from metagpt.provider.llm_provider_registry import create_llm_instance
from metagpt.utils.cost_manager import CostManager

DatasetType = Literal["HumanEval", "MBPP", "GSM8K", "MATH", "HotpotQA", "DROP"]


class Workflow:
    def __init__(self, name: str, llm_config, dataset: DatasetType) -> None:
        self.name = name
        self.dataset = dataset
        self.llm = create_llm_instance(llm_config)
        self.llm.cost_manager = CostManager()
        self.answer_generate = operator.AnswerGenerate(self.llm)
        self.sc_ensemble = operator.ScEnsemble(self.llm)

    async def __call__(self, problem: str):
        solutions = []
        for _ in range(3):
            result = await self.answer_generate(input=prompt_custom.SOLVE_PROMPT + "\\n\\n" + problem)
            solutions.append(result["answer"])
        final = await self.sc_ensemble(solutions=solutions, problem=problem)
        return final["response"], self.llm.cost_manager.total_cost
'''
AFLOW_ENSEMBLE_PROMPT = 'SOLVE_PROMPT = "Solve it carefully."\n'


def test_query_mode_return_is_the_final_canvas_score_as_a_hand_written_workflow_scores(data_dir, tmp_path):
    """Edits cost nothing and score nothing; FINISH runs the final canvas on the problem. The AFlow-format
    round file that writes the same workflow by hand scores the same, through the same executor."""
    from aflow.benchmarks import get_benchmark
    from aflow.config import LLMConfig
    from aflow.evaluate import run_problem
    from aflow.llm import LLMClient
    from aflow.sandbox import Sandbox
    from aflow.workflows import from_source

    problems = gsm8k_problems(data_dir, 2)  # the first is answered right, the second wrong
    edits = ["ENSEMBLE 1 3", CAREFUL.replace("carefully", "with care"), "FINISH"]
    with FakeOpenAI() as fake:
        fake.reply = scripted(problems)
        worker = worker_of(fake, data_dir, tmp_path, mode="query")

        async def episodes():
            out = []
            for i, problem in enumerate(problems):
                first = await worker.reset(f"q{i}", f"u{i}", query_row(problem))
                steps = [await worker.step(f"q{i}", t) for t in edits]
                out.append((first, steps, await worker.close(f"q{i}")))
            await worker.shutdown()
            return out

        async def by_hand():
            workflow = from_source(AFLOW_ENSEMBLE_GRAPH, AFLOW_ENSEMBLE_PROMPT.replace("carefully", "with care"))
            assert workflow.format == "aflow"
            llm = LLMClient(LLMConfig(base_url=fake.base_url, model="fake-model", cache=False))
            async with Sandbox() as sandbox:
                records = [(await run_problem(get_benchmark("gsm8k"), p, workflow, llm, {}, sandbox, scoring="reward"))[0]
                           for p in problems]
            await llm.close()
            return [r.score for r in records]

        runs = asyncio.run(episodes())
        canvas_prompts = {r.body["messages"][-1]["content"] for r in fake.chat_requests}
        fake.reset()
        hand = asyncio.run(by_hand())
        hand_prompts = {r.body["messages"][-1]["content"] for r in fake.chat_requests}
    assert hand == [1.0, 0.0]
    final = cv.replay(cv.initial(False), edits[:2])
    for (first, steps, summary), expected in zip(runs, hand, strict=True):
        assert "Design a workflow" in first["observation"] and "1. ANSWER" in first["observation"]
        assert [s["reward"] for s in steps] == [0.0, 0.0, expected]
        assert [s["done"] for s in steps] == [False, False, True]
        assert "ensemble of 3" in steps[0]["observation"]  # the edited canvas is shown back
        assert steps[2]["info"]["score"] == expected
        assert summary["final_graph"] == cv.compile_canvas(final, False)[0]
        assert operators_used(summary["final_graph"]) == {"AnswerGenerate", "ScEnsemble"}
        assert episode_reward(summary, EnvConfig().reward)[1]["return"] == expected
    assert canvas_prompts == hand_prompts  # the very same executor requests


def test_query_mode_scores_the_last_valid_canvas_after_max_turns(data_dir, tmp_path):
    with FakeOpenAI() as fake:
        fake.reply = scripted(gsm8k_problems(data_dir, 1))
        worker = worker_of(fake, data_dir, tmp_path, mode="query", max_turns=2)
        problem = gsm8k_problems(data_dir, 1)[0]

        async def go():
            await worker.reset("q", "u", query_row(problem))
            steps = [await worker.step("q", t) for t in ("ADD FORMAT", "ADD TEST")]  # TEST: code benchmarks only
            summary = await worker.close("q")
            await worker.shutdown()
            return steps, summary

        steps, summary = asyncio.run(go())
    assert steps[0]["info"]["valid"] and steps[0]["reward"] == 0.0 and "2. FORMAT" in steps[0]["observation"]
    assert not steps[1]["info"]["valid"] and steps[1]["done"] and "not available" in steps[1]["info"]["reason"]
    assert steps[1]["reward"] == 1.0 == steps[1]["info"]["score"]  # the run of ANSWER + FORMAT, the last valid canvas
    assert summary["final_graph"] == cv.compile_canvas(cv.replay(cv.initial(False), ["ADD FORMAT"]), False)[0]
    total, parts = episode_reward(summary, EnvConfig().reward)
    assert parts["return"] == 1.0 and parts["format"] == pytest.approx(-0.1)


def random_line(rng: random.Random) -> str:
    """A valid line, a valid line in prose, a broken one, or noise."""
    line = random_accepted(rng, GRAMMAR)
    pick = rng.random()
    if pick < 0.5:
        return line
    if pick < 0.6:
        return f"I will do this:\n{line}\nbecause it helps."
    if pick < 0.8:
        return line[: rng.randrange(len(line) + 1)] + rng.choice(["", " 9", '"', "\n\n", "x" * 300])
    return "".join(rng.choice(string.printable) for _ in range(rng.randrange(60)))


@pytest.mark.parametrize("mode", ["query", "task"])
def test_random_action_lines_never_crash_an_episode(data_dir, fake_openai, mode):
    from aflow.benchmarks import get_benchmark, public_tests
    from aflow.config import LLMConfig
    from aflow.llm import LLMClient
    from aflow.sandbox import Sandbox
    from agent_system.environments.env_package.aflow.draws import Draws
    from agent_system.environments.env_package.aflow.measure import Meter, Scored
    from agent_system.environments.env_package.aflow.spaces import query_episode, start_workflow

    rng = random.Random(14)
    benches = [get_benchmark("gsm8k"), get_benchmark("humaneval")]
    problems = {b.name: b.load("validate", data_dir, 3) for b in benches}
    tests = {b.name: public_tests(b.name, data_dir) if b.is_code else {} for b in benches}
    fake_openai.reply = scripted(problems["gsm8k"])
    seen = {"valid": 0, "invalid": 0, "finish": 0}

    async def go():
        llm = LLMClient(LLMConfig(base_url=fake_openai.base_url, model="fake-model", max_tokens=32))
        async with Sandbox() as sandbox:
            for n in range(40 if mode == "query" else 12):
                bench = benches[n % 2]
                meter = Meter(bench, llm, sandbox, tests[bench.name])
                if mode == "query":
                    episode = query_episode("canvas", bench, problems[bench.name][0], "", meter, max_turns=5,
                                            max_action_chars=200)
                else:
                    seed = start_workflow("canvas", bench.is_code, "")
                    episode = CanvasEpisode("task", meter, 5, Scored(seed.graph, seed.prompt, 0.0), seed, 1, [],
                                            Draws(problems[bench.name], 1, 1, 0), 200)
                while not episode.done:
                    observation, reward, done, info = await episode.step(random_line(rng))
                    assert isinstance(observation, str) and isinstance(reward, float) and isinstance(info["anchor"], str)
                    assert info["valid"] or info["reason"]
                    seen["valid" if info["valid"] else "invalid"] += 1
                    seen["finish"] += episode.finished
                outcome = episode.outcome()
                assert cv.canvas_of(outcome.final_graph, episode.current.prompt) == episode.canvas
                if mode == "query":
                    assert outcome.turns[-1].score is not None and 0.0 <= outcome.turns[-1].reward <= 1.0
        await llm.close()

    asyncio.run(go())
    assert seen["valid"] > 5 and seen["invalid"] > 5 and seen["finish"] > 0, seen


# ---- Ray actors, the real embedded executor ----------------------------------------------------

def test_canvas_task_mode_through_ray_actors(ray_cluster, embedded_executor, data_dir, tmp_path):
    from tests.test_env_worker import Episodes, env_dict

    config = env_dict(embedded_executor, data_dir, action_space="canvas")

    async def go():
        envs = Episodes(config, group_n=2, workdir=str(tmp_path / "env"))
        obs = await envs.reset([{"uid": "row-1", "extra_info": {"benchmark": "gsm8k"}}])
        assert obs[0] == obs[1] and "1. ANSWER" in obs[0]
        _, rewards, dones, infos = await envs.step(["ENSEMBLE 1 2", "DELETE 7"])
        assert infos[0]["valid"] and not infos[1]["valid"] and rewards[1] == 0.0
        assert infos[0]["anchor"] == infos[1]["anchor"] == cv.anchor(cv.initial(False))
        assert rewards[0] == pytest.approx(infos[0]["score"] - float(obs[0].split("validation score ")[1][:6]))
        _, rewards, dones, infos = await envs.step(["FINISH", "FINISH"])
        assert dones == [True, True] and rewards == [0.0, 0.0]
        summaries = await envs.close()
        tree = await envs.episodes[0][0].tree_summary.remote("gsm8k")
        return summaries, tree

    summaries, tree = asyncio.run(go())
    assert len(tree) == 2 and [t["modification"] for t in summaries[0]["turns"]] == ["ENSEMBLE 1 2", "FINISH"]


def test_task_mode_cannot_farm_credit_by_cycling_back_to_a_visited_canvas(data_dir, tmp_path):
    """Adversarial: a policy that worsens the workflow and then undoes it would collect +Δ for the undo each
    time round. Returning to any canvas the episode has been at is rejected (format penalty, no score), so
    the return stays final - start: 0 for a lap that ends where it began, the reference edit earns +0.5."""
    with FakeOpenAI() as fake:
        fake.reply = task_script(data_dir)
        worker = worker_of(fake, data_dir, tmp_path, max_turns=2)

        async def go():
            await worker.reset("c", "uid-c", {"extra_info": {"benchmark": "gsm8k"}})
            steps = [await worker.step("c", text) for text in ("ADD FORMAT", "DELETE 2")]
            summary = await worker.close("c")
            await worker.shutdown()
            return steps, summary

        steps, summary = asyncio.run(go())
    away, back = steps
    assert away["info"]["valid"]
    assert not back["info"]["valid"] and "already tried" in back["info"]["reason"] and back["reward"] == 0.0
    total, parts = episode_reward(summary, EnvConfig().reward)
    assert parts["return"] == pytest.approx(away["reward"])  # only the one edit's change, never a lap's
    assert total <= parts["return"] - 0.1
