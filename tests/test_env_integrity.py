"""The environment's reward pays for better workflows, and for nothing else (issue 20).

Each test plays a hostile policy's strategy against an honest one on in-process AFlowWorkers (the
real sandbox, a real local OpenAI-compatible executor, tests/fake_openai.py) and checks that the
hostile strategy earns no more than the honest one; most of them earned more before.

The executor answers a problem right when the prompt says "carefully" or the problem is one of a
fixed half of the scoring pool, else "-1": the start workflow (builtin:io) scores 0.5 on the pool,
the honest edit ("carefully") 1.0. Task mode runs on a small split (tests.samples.small_split): two
feedback problems, shown to the policy, and a scoring pool every step's sample covers.
"""

from __future__ import annotations

import asyncio

import pytest

from aflow.benchmarks import get_benchmark
from agent_system.config import EnvConfig
from agent_system.reward import episode_reward
from tests.fake_openai import FakeOpenAI
from tests.samples import GRAPH, operator_reply, small_split

N = 8  # problems in the small split: 2 feedback + a pool of 6
ROW = {"extra_info": {"benchmark": "gsm8k"}}
HONEST = f"<modification>Ask for care.</modification><graph>{GRAPH}</graph><prompt>STYLE = 'Solve it carefully.'</prompt>"


def split_problems(data_dir, n: int = N):
    return get_benchmark("gsm8k").load("validate", data_dir, n)


def cut(data_dir, n: int = N, sample: int = N - 2):
    from agent_system.environments.env_package.aflow.draws import Draws

    return Draws(split_problems(data_dir, n), sample, 2, EnvConfig().seed)


def executor(problems, right_ids):
    def answer_for(content: str) -> str:
        for p in problems:
            if p.inputs["problem"][:80] in content:
                return p.gold if p.id in right_ids or "carefully" in content else "-1"
        return "0"

    def reply(messages, body):
        content = messages[-1]["content"]
        return operator_reply(content, answer_for(content)) or answer_for(content)

    return reply


def worker(fake, data_dir, tmp_path, n: int = N, name: str = "env", **overrides):
    from agent_system.environments.env_package.aflow.worker import AFlowWorker

    config = {"mode": "task", "max_turns": 1, "eval_subset_size": n - 2, "feedback_size": 2, "num_workers": 1,
              "executor": {"base_url": fake.base_url, "model": "self-hosted", "max_tokens": 32},
              "data_dir": str(small_split(data_dir, tmp_path / f"data-{n}", n=n)), **overrides}
    return AFlowWorker(config, str(tmp_path / name))


def half_right(data_dir, n: int = N, sample: int = N - 2):
    return {p.id for p in cut(data_dir, n, sample).pool[: (n - 2) // 2]}


def workflow_answer(graph: str, prompt: str = "STYLE = ''", what: str = "hostile") -> str:
    return f"<modification>{what}</modification><graph>{graph}</graph><prompt>{prompt}</prompt>"


async def episodes(w, texts_by_episode: dict[str, list[str]], uid: str = "u") -> tuple[dict, dict, dict]:
    """Each episode (same uid: one GRPO group) resets, takes its turns, closes; concurrently.
    Returns (first observations, steps, summaries), each by episode."""

    async def one(eid, texts):
        first = await w.reset(eid, uid, ROW)
        steps = [await w.step(eid, t) for t in texts]
        return first, steps, await w.close(eid)

    results = await asyncio.gather(*(one(e, t) for e, t in texts_by_episode.items()))
    by_episode = dict(zip(texts_by_episode, results, strict=True))
    return ({e: r[0] for e, r in by_episode.items()}, {e: r[1] for e, r in by_episode.items()},
            {e: r[2] for e, r in by_episode.items()})


def run_episodes(w, texts_by_episode: dict[str, list[str]], uid: str = "u", then=None):
    """`episodes` in a fresh event loop, then `then(w)` (awaited) in the same loop, then the worker shut down."""

    async def go():
        try:
            result = await episodes(w, texts_by_episode, uid)
            return (*result, await then(w)) if then else result
        finally:
            await w.shutdown()

    return asyncio.run(go())


async def summary(w) -> list[dict]:
    return await w.tree_summary("gsm8k")


def episode_return(summary) -> float:
    return episode_reward(summary, EnvConfig().reward)[0]


# ---- 1. memorising the problems the observation showed ----------------------------------------------

def memoriser(shown: dict[str, str]) -> str:
    """A workflow that answers the problems it was shown from memory, and asks the executor as the
    start workflow does otherwise."""
    table = {text[:60]: answer for text, answer in shown.items()}
    return f'''from aflow_ops import Custom
import prompt

MEMORY = {table!r}


class Workflow:
    def __init__(self):
        self.custom = Custom()

    async def __call__(self, problem):
        for snippet, answer in MEMORY.items():
            if snippet in problem:
                return answer
        return (await self.custom(input=problem, instruction=prompt.STYLE))["response"]
'''


def test_memorising_the_shown_problems_earns_nothing_and_none_of_the_scored_ones_is_ever_shown(data_dir, tmp_path):
    problems = split_problems(data_dir)
    draws = cut(data_dir)
    with FakeOpenAI() as fake:
        fake.reply = executor(problems, half_right(data_dir))
        w = worker(fake, data_dir, tmp_path)

        async def go():
            try:
                first = (await w.reset("probe", "u", ROW))["observation"]
                await w.close("probe")
                shown = {p.inputs["problem"]: p.gold for p in problems if p.inputs["problem"][:60] in first}
                # a perfect memoriser: it answers every problem the observation showed, and it is right
                hostile = workflow_answer(memoriser(shown), "STYLE = 'Answer.'")
                return first, shown, await episodes(w, {"hostile": [hostile], "honest": [HONEST]})
            finally:
                await w.shutdown()

        first, shown, (_, steps, summaries) = asyncio.run(go())
    assert shown and set(shown) <= {p.inputs["problem"] for p in draws.feedback}
    assert not any(p.inputs["problem"][:60] in first for p in draws.pool)  # the scored problems: never shown
    hostile, honest = steps["hostile"][0], steps["honest"][0]
    assert hostile["info"]["valid"] and hostile["reward"] == 0.0  # it scores what the start scores
    assert honest["reward"] == pytest.approx(0.5)
    assert episode_return(summaries["hostile"]) <= episode_return(summaries["honest"])


@pytest.mark.parametrize("graph", [
    'class Workflow:\n    async def __call__(self, problem):\n        return "{gold}"\n',  # the policy's own answer
    GRAPH.replace('return result["response"]', 'return "{gold}"'),  # asks the executor, ignores it
    GRAPH.replace('return result["response"]', 'return "{gold}" if "{snippet}" in problem else result["response"]'),
])
def test_query_mode_an_answer_that_does_not_come_from_the_executor_earns_nothing(data_dir, tmp_path, graph):
    from tests.test_env_canvas import query_row

    problem = split_problems(data_dir, 1)[0]
    hostile = graph.format(gold=problem.gold, snippet=problem.inputs["problem"][:30].replace('"', ""))
    with FakeOpenAI() as fake:
        fake.reply = executor([problem], set())  # wrong unless asked to be careful
        w = worker(fake, data_dir, tmp_path, mode="query")

        async def one(eid, text):
            await w.reset(eid, eid, query_row(problem))
            step = await w.step(eid, text)
            return step, await w.close(eid)

        async def go():
            try:
                return await one("hostile", workflow_answer(hostile)), await one("honest", HONEST)
            finally:
                await w.shutdown()

        (hostile_step, hostile_summary), (honest_step, honest_summary) = asyncio.run(go())
    assert hostile_step["info"]["valid"] and hostile_step["reward"] == 0.0
    assert honest_step["reward"] == 1.0
    assert episode_return(hostile_summary) < episode_return(honest_summary)


def test_without_the_counterfactual_the_policys_own_answer_would_score(data_dir, tmp_path):
    """The control of the test above: with env.reward.counterfactual off (the reward as it was), the
    workflow that returns the policy's own answer earns the full score."""
    from tests.test_env_canvas import query_row

    problem = split_problems(data_dir, 1)[0]
    own = f'class Workflow:\n    async def __call__(self, problem):\n        return "{problem.gold}"\n'
    with FakeOpenAI() as fake:
        fake.reply = executor([problem], set())
        w = worker(fake, data_dir, tmp_path, mode="query", reward={"counterfactual": False})

        async def go():
            try:
                await w.reset("e", "e", query_row(problem))
                return await w.step("e", workflow_answer(own))
            finally:
                await w.shutdown()

        step = asyncio.run(go())
    assert step["reward"] == 1.0 and fake.count == 0


def test_a_constant_that_happens_to_be_right_on_some_scored_problems_earns_nothing(data_dir, tmp_path):
    """A guess the pool rewards sometimes (here: the right answer of one scored problem, for all)."""
    problems = split_problems(data_dir)
    lucky = cut(data_dir).pool[0].gold
    constant = GRAPH.replace('return result["response"]', f'return "{lucky}"')
    with FakeOpenAI() as fake:
        fake.reply = executor(problems, half_right(data_dir))
        w = worker(fake, data_dir, tmp_path)
        _, steps, _ = run_episodes(w, {"hostile": [workflow_answer(constant)]})
        raw = w.tasks[("gsm8k", "validate")].scored  # merged nodes keep their measurement
    node = next(s for s in raw.values() if lucky in s.graph)
    assert node.raw > 0 and node.score == 0.0
    assert steps["hostile"][0]["reward"] == pytest.approx(-0.5)  # below the start's 0.5


# ---- 2. cosmetic edits, noise ---------------------------------------------------------------------------

def builtin_io() -> tuple[str, str]:
    from aflow.workflows import load_workflow

    start = load_workflow("builtin:io")
    return start.graph, start.prompt


@pytest.mark.parametrize("edit", ["comment", "docstring", "whitespace", "rename"])
def test_a_cosmetic_edit_is_an_invalid_turn_and_adds_no_node(data_dir, tmp_path, edit):
    graph, prompt = builtin_io()
    graph, prompt = {
        "comment": (graph.replace("class Workflow:", "class Workflow:\n    # better now"), prompt),
        "docstring": (graph.replace('"""IO: the executor answers the problem directly."""', '"""Improved."""'), prompt),
        "whitespace": (graph + "\n\n", prompt.replace("Answer the question.", "Answer  the question. ")),
        "rename": (graph.replace("result", "reply"), prompt),
    }[edit]
    with FakeOpenAI() as fake:
        fake.reply = executor(split_problems(data_dir), half_right(data_dir))
        w = worker(fake, data_dir, tmp_path)
        _, steps, summaries, tree = run_episodes(w, {"cosmetic": [workflow_answer(graph, prompt)]}, then=summary)
    step = steps["cosmetic"][0]
    assert not step["info"]["valid"] and "behaviourally the same workflow" in step["info"]["reason"]
    assert step["reward"] == 0.0 and episode_return(summaries["cosmetic"]) == pytest.approx(-0.1)
    assert len(tree) == 1


def test_cosmetic_variants_from_one_group_are_one_node_with_two_measurements(data_dir, tmp_path):
    variant = HONEST.replace("Solve it carefully.", "Solve it  carefully. ")
    with FakeOpenAI() as fake:
        fake.reply = executor(split_problems(data_dir), half_right(data_dir))
        w = worker(fake, data_dir, tmp_path)
        _, steps, _, tree = run_episodes(w, {"a": [HONEST], "b": [variant]}, then=summary)
    assert [s[0]["reward"] for s in steps.values()] == [pytest.approx(0.5)] * 2
    assert len(tree) == 2 and tree[1]["scores"] == [1.0, 1.0]


def test_a_node_is_measured_again_on_fresh_problems_by_every_step_that_starts_from_it(data_dir, tmp_path):
    """Winner's curse: one lucky draw used to be a node's score for good. Now the step after a proposal
    measures it again, paired with the next proposal, on that step's own sample."""
    n, sample = 14, 4
    draws = cut(data_dir, n, sample)
    second = HONEST.replace("Ask for care.", "Ask for care, twice.").replace("carefully.", "carefully, twice.")
    with FakeOpenAI() as fake:
        fake.reply = executor(split_problems(data_dir, n), set())
        w = worker(fake, data_dir, tmp_path, n=n, eval_subset_size=sample, max_turns=2)
        _, steps, _, tree = run_episodes(w, {"e": [HONEST, second]}, then=summary)
    samples = [draws.sample("u", turn) for turn in (0, 1)]
    assert {p.id for p in samples[0]} != {p.id for p in samples[1]}  # fresh problems each step
    first_node = next(node for node in tree if node["modification"] == "Ask for care.")
    assert first_node["scores"] == [1.0, 1.0]  # its own step's sample, then the next step's
    assert [s["reward"] for s in steps["e"]] == [pytest.approx(1.0), pytest.approx(0.0)]  # paired on one sample


def test_the_rollouts_of_a_group_are_scored_on_the_same_problems_and_the_start_is_measured_once(data_dir, tmp_path):
    n, sample = 14, 4
    problems = split_problems(data_dir, n)
    with FakeOpenAI() as fake:
        fake.reply = executor(problems, set())
        w = worker(fake, data_dir, tmp_path, n=n, eval_subset_size=sample)
        _, _, _, tree = run_episodes(w, {"a": [HONEST], "b": [HONEST.replace("carefully", "very carefully")]},
                                     uid="g", then=summary)
        asked = [r.body["messages"][-1]["content"] for r in fake.chat_requests]
    draws = cut(data_dir, n, sample)
    feedback = {p.id for p in draws.feedback}

    def seen(marker: str) -> set[str]:
        return {p.id for p in problems if any(p.inputs["problem"][:80] in c and marker in c for c in asked)}

    drawn = {p.id for p in draws.sample("g", 0)}
    assert seen("Solve it very carefully.") - feedback == drawn == seen("Solve it carefully.") - feedback
    root = next(node for node in tree if node["parent"] is None)
    assert len(root["scores"]) == 2  # its own first measurement, then one on the group's sample (not one each)


# ---- 3. ensembles ---------------------------------------------------------------------------------------

def test_an_ensemble_of_independent_samples_beats_one_sample(data_dir, tmp_path):
    """Canvas: ENSEMBLE 1 3 used to send one request three times and get one cached answer three times,
    so it scored exactly as no ensemble. Here the first sample of a request is wrong and the repeats
    (temperature, seed 1, 2) are right: majority voting helps, and the reward says so."""
    problems = split_problems(data_dir)

    def reply(messages, body):
        content = messages[-1]["content"]
        for p in problems:
            if p.inputs["problem"][:80] in content:
                answer = p.gold if body.get("seed") else "-1"
                break
        else:
            answer = "0"
        return operator_reply(content, answer) or f"<thought>t</thought><answer>{answer}</answer>"

    with FakeOpenAI() as fake:
        fake.reply = reply
        w = worker(fake, data_dir, tmp_path, action_space="canvas")
        _, steps, _ = run_episodes(w, {"three": ["ENSEMBLE 1 3"], "five": ["ENSEMBLE 1 5"]})
        seeds = sorted({(r.body.get("temperature"), r.body.get("seed")) for r in fake.chat_requests})
    assert steps["three"][0]["info"]["score"] == 1.0 and steps["three"][0]["reward"] == 1.0
    assert steps["five"][0]["info"]["score"] == 1.0
    assert seeds == [(0.0, None), (0.7, 1), (0.7, 2), (0.7, 3), (0.7, 4)]


# ---- 4. failures are charged to the workflow that caused them ------------------------------------------

HANG = '''class Workflow:
    async def __call__(self, problem):
        while True:
            pass
'''


def test_a_hanging_workflow_fails_its_own_problems_within_its_budget_and_no_sibling_pays(data_dir, tmp_path):
    with FakeOpenAI() as fake:
        fake.reply = executor(split_problems(data_dir), half_right(data_dir))
        w = worker(fake, data_dir, tmp_path, concurrency=2, workflow_concurrency=1, workflow_time_budget_s=3,
                   problem_time_limit_s=2)

        async def one(eid, text):
            await w.reset(eid, "u", ROW)
            step = await w.step(eid, text)
            errors = w.episodes[eid].nodes[-1][1].errors
            return step, errors, await w.close(eid)

        async def go():
            try:
                return await asyncio.gather(one("hang", workflow_answer(HANG)), one("honest", HONEST))
            finally:
                await w.shutdown()

        (hang, hang_errors, hang_summary), (honest, honest_errors, honest_summary) = asyncio.run(go())
    assert honest["reward"] == pytest.approx(0.5) and honest_errors == [] and not honest_summary["failed"]
    assert hang["info"]["valid"] and hang["reward"] == pytest.approx(-0.5) and not hang_summary["failed"]
    assert len(hang_errors) == N - 2
    spent = [e for e in hang_errors if "time budget was spent" in e]
    assert len(spent) >= N - 2 - 2  # at most two problems ran (2 s, then the 1 s left), the rest never started


# ---- 5. executor use is bounded and paid for -------------------------------------------------------------

CHATTY = GRAPH.replace('''        result = await self.custom(input=problem, instruction=prompt.STYLE)
        return result["response"]''', '''        answer = ""
        for i in range(60):
            answer = (await self.custom(input=problem, instruction=prompt.STYLE + str(i)))["response"]
        return answer''')


def test_sixty_calls_per_problem_are_refused_and_tokens_are_charged_even_when_cached(data_dir, tmp_path):
    problems = split_problems(data_dir)
    with FakeOpenAI() as fake:
        fake.reply = executor(problems, {p.id for p in problems})  # every answer right: calls are all it costs
        w = worker(fake, data_dir, tmp_path, max_calls_per_run=10)
        _, steps, summaries = run_episodes(w, {"chatty": [workflow_answer(CHATTY, "STYLE = 'x'")]})
        errors = w.tasks[("gsm8k", "validate")].scored[2].errors
        chatty_calls = sum("x" in r.body["messages"][-1]["content"][:3] for r in fake.chat_requests)
        again = worker(fake, data_dir, tmp_path)  # a new run in the same workdir: the same response cache
        _, _, replayed = run_episodes(again, {"honest": [HONEST]})
        _, _, first_honest = run_episodes(worker(fake, data_dir, tmp_path, name="env-3"), {"honest": [HONEST]})
    assert steps["chatty"][0]["reward"] == pytest.approx(-1.0) and len(errors) == N - 2
    assert all("call budget spent (10 calls" in e for e in errors)
    assert chatty_calls <= 10 * N  # never 60 per problem
    assert summaries["chatty"]["cost_usd"] == 0.0 and summaries["chatty"]["tokens"] > 0  # an unlisted model
    parts = episode_reward(summaries["chatty"], EnvConfig.from_dict({"reward": {"token_penalty": 0.01}}).reward)[1]
    assert parts["tokens"] < 0
    assert replayed["honest"]["tokens"] == first_honest["honest"]["tokens"] > 0  # cache hits count their tokens


# ---- 6. bounded state, experience per run ----------------------------------------------------------------

def test_huge_outputs_are_not_kept_and_a_new_run_does_not_inherit_another_runs_experience(data_dir, tmp_path):
    huge = GRAPH.replace('return result["response"]', 'return result["response"] + "x" * 2_000_000')
    with FakeOpenAI() as fake:
        fake.reply = executor(split_problems(data_dir), half_right(data_dir))
        w = worker(fake, data_dir, tmp_path)
        second_run = worker(fake, data_dir, tmp_path)  # same workdir and experience file, a new run

        async def go():
            try:
                await episodes(w, {"huge": [workflow_answer(huge, what="Append padding.")]})
                same_run = (await w.reset("e2", "u", ROW))["observation"]
                return same_run, (await second_run.reset("e", "u", ROW))["observation"]
            finally:
                await w.shutdown()
                await second_run.shutdown()

        same_run, observation = asyncio.run(go())
        node = w.tasks[("gsm8k", "validate")].scored[2]
    assert node.failures and all(len(f["output"]) < 1200 for f in node.failures)
    assert node.output is None and node.counterfactual_output is None
    assert "Append padding." in same_run and "Append padding." not in observation

