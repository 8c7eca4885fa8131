"""QA scoring variants: under `reward` an answer that hedges or stuffs words never scores above an
honest wrong answer; under `aflow` AFlow's plain best-reference F1 is kept; every gold answer of the
real data keeps 1.0; the judge cannot restore a hedge's credit; the variant is named in the CLI's
results and in an optimize workspace."""

from __future__ import annotations

import asyncio
import json
import os
import re
import statistics
import subprocess
import sys

import pytest

from aflow.benchmarks import Problem, get_benchmark, qa
from tests.fake_openai import FakeOpenAI
from tests.samples import GRAPH

OLYMPICS = "Which city hosted the 1900 Summer Olympics?"
BANDS = "Which band formed first, Awolnation or Foo Fighters?"
ORCHIDS = "Are Lygodium and Maxillaria both genera of orchids?"
GENDER = "Which gender group is larger: females or males?"
AGES = "Which age group is larger: under the age of 18 or 65 years of age or older?"


def problem(benchmark: str, question: str, answers: list[str]) -> Problem:
    """A problem whose input has the shape the loaders give it (the question after the passage)."""
    if benchmark == "hotpotqa":
        text = f"Context: A passage about many things.\n\nQuestion: {question}\n\nAnswer:"
    else:
        text = f"Passage: A passage about many things.\nQuestion: {question}\nAnswer:"
    return Problem(id="t", inputs={"problem": text}, reference={"answers": answers}, gold=answers[0])


def score(benchmark: str, p: Problem, output: str, scoring: str) -> tuple[float, str | None]:
    return asyncio.run(get_benchmark(benchmark).score(p, output, scoring=scoring))


# (benchmark, question, references, hedge, an honest wrong answer, start of the reward reason)
HEDGES = [
    ("hotpotqa", BANDS, ["Foo Fighters"], "Awolnation Foo Fighters", "Awolnation", "hedged: names"),
    ("hotpotqa", BANDS, ["Foo Fighters"], "Foo Fighters, Awolnation", "Awolnation", "hedged: names"),
    ("drop", GENDER, ["females"], "females males", "males", "hedged: names"),
    ("drop", AGES, ["65 years of age or older"], "under the age of 18 or 65 years of age or older",
     "under the age of 18", "hedged: names"),
    ("hotpotqa", ORCHIDS, ["no"], "yes no", "yes", "hedged: answers both yes and no"),
    ("hotpotqa", ORCHIDS, ["no"], "No, yes.", "yes", "hedged: answers both yes and no"),
    ("hotpotqa", ORCHIDS, ["yes"], "yes or no", "no", "hedged"),
    ("hotpotqa", OLYMPICS, ["Paris"], "Paris, London, Athens", "London", "stuffed"),
    ("hotpotqa", OLYMPICS, ["Paris"], "Paris London Athens Berlin Rome", "London", "stuffed"),
    ("hotpotqa", OLYMPICS, ["Paris"], "Paris qwerty zxcvb asdfg", "London", "stuffed"),
    ("drop", "How many yards was the longest field goal?", ["52"], "52 48 45 37", "48", "hedged: offers more numbers"),
    ("drop", "How many yards was the longest field goal?", ["52"], "52 48", "48", "hedged: offers more numbers"),
    ("drop", "How many yards was the longest field goal?", ["52"], "48 or 52 yards", "48", "hedged"),
    ("hotpotqa", OLYMPICS, ["Paris"], "Paris | London", "London", "hedged: offers alternatives (|)"),
    ("hotpotqa", OLYMPICS, ["Paris"], "Paris or London", "London", "hedged: offers alternatives (or)"),
    ("hotpotqa", OLYMPICS, ["Paris"], "Paris/London", "London", "hedged: offers alternatives (/)"),
    ("hotpotqa", OLYMPICS, ["Paris"], "Paris / London", "London", "hedged: offers alternatives (/)"),
    ("hotpotqa", OLYMPICS, ["Paris"], "either Paris or London", "London", "hedged: offers alternatives"),
    ("hotpotqa", OLYMPICS, ["Paris"], "Paris; London", "London", "hedged: offers alternatives (;)"),
    ("hotpotqa", OLYMPICS, ["Paris"], "Paris\nLondon", "London", "hedged: offers alternatives (line break)"),
    ("hotpotqa", BANDS, ["Foo Fighters"], "Foo Fighters or Awolnation", "Awolnation", "hedged"),
]


@pytest.mark.parametrize("benchmark,question,answers,hedge,wrong,reason", HEDGES)
def test_hedging_scores_zero_as_a_reward(benchmark, question, answers, hedge, wrong, reason):
    p = problem(benchmark, question, answers)
    value, why = score(benchmark, p, hedge, "reward")
    assert value == 0.0 and why.startswith(reason), why
    assert value <= score(benchmark, p, wrong, "reward")[0]
    assert not any(a.lower() in why.lower() for a in answers if len(a) > 3)  # the reason never quotes a reference
    assert score(benchmark, p, answers[0], "reward") == (1.0, None)


# AFlow's token F1 of each hedge above, by hand: SQuAD normalization (lower case, punctuation
# deleted, so "Paris/London" is the one token "parislondon", articles dropped), then with c tokens
# in common, p predicted and r reference tokens, F1 = 2c / (p + r).
AFLOW_F1 = {
    "Awolnation Foo Fighters": 4 / 5,  # c=2, p=3, r=2
    "Foo Fighters, Awolnation": 4 / 5,
    "females males": 2 / 3,  # c=1, p=2, r=1
    # "under age of 18 or 65 years of age or older": p=11, all 6 reference tokens in common
    "under the age of 18 or 65 years of age or older": 12 / 17,
    "yes no": 2 / 3,
    "No, yes.": 2 / 3,
    "yes or no": 1 / 2,  # c=1, p=3, r=1
    "Paris, London, Athens": 1 / 2,
    "Paris London Athens Berlin Rome": 1 / 3,  # c=1, p=5
    "Paris qwerty zxcvb asdfg": 2 / 5,  # c=1, p=4
    "52 48 45 37": 2 / 5,  # DROP's best part of "|": there is only one part
    "52 48": 2 / 3,
    "48 or 52 yards": 2 / 5,  # c=1, p=4
    "Paris | London": 2 / 3,
    "Paris or London": 1 / 2,
    "Paris/London": 0.0,
    "Paris / London": 2 / 3,
    "either Paris or London": 2 / 5,
    "Paris; London": 2 / 3,
    "Paris\nLondon": 2 / 3,
    "Foo Fighters or Awolnation": 2 / 3,  # c=2, p=4, r=2
}


@pytest.mark.parametrize("benchmark,question,answers,hedge,wrong,reason", HEDGES)
def test_aflow_scoring_keeps_plain_best_reference_f1(benchmark, question, answers, hedge, wrong, reason):
    p = problem(benchmark, question, answers)
    assert score(benchmark, p, hedge, "aflow") == (pytest.approx(AFLOW_F1[hedge]), None)
    assert score(benchmark, p, answers[0], "aflow") == (1.0, None)


def test_under_aflow_hedging_pays_which_is_why_rewards_use_the_gate():
    cases = [(BANDS, ["Foo Fighters"], "Awolnation Foo Fighters", "Awolnation"),
             (ORCHIDS, ["no"], "yes no", "yes"),
             (OLYMPICS, ["Paris"], "Paris | London", "London"),
             (OLYMPICS, ["Paris"], "Paris qwerty zxcvb asdfg", "London")]
    for question, answers, hedge, wrong in cases:
        p = problem("hotpotqa", question, answers)
        assert score("hotpotqa", p, hedge, "aflow")[0] > score("hotpotqa", p, wrong, "aflow")[0] == 0.0


@pytest.mark.parametrize("benchmark,question,answers,output,expected", [
    ("hotpotqa", OLYMPICS, ["Paris"], "Paris", 1.0),
    ("hotpotqa", OLYMPICS, ["Paris"], "PARIS.", 1.0),
    ("hotpotqa", OLYMPICS, ["Paris"], "  paris!  ", 1.0),
    ("hotpotqa", BANDS, ["Foo Fighters"], "The Foo Fighters", 1.0),
    ("hotpotqa", BANDS, ["Foo Fighters"], "foo fighters.", 1.0),
    ("hotpotqa", ORCHIDS, ["no"], "No.", 1.0),
    ("drop", "Where were more people born?", ["the United Kingdom"], "United Kingdom", 1.0),
    ("drop", AGES, ["65 years of age or older"], "65 years of age or older", 1.0),
    ("hotpotqa", "What band did AC/DC tour with?", ["AC/DC"], "AC/DC", 1.0),
    # an honest near miss whose words are not the question's keeps its partial credit
    ("hotpotqa", "Where is the Empire State Building?", ["New York"], "New York City", 0.8),
    ("hotpotqa", OLYMPICS, ["Paris"], "London", 0.0),
])
def test_honest_answers_score_the_same_under_both_variants(benchmark, question, answers, output, expected):
    p = problem(benchmark, question, answers)
    for scoring in ("aflow", "reward"):
        value, why = score(benchmark, p, output, scoring)
        assert value == pytest.approx(expected) and why is None, (scoring, why)


# (question, references, an honest answer that repeats the question's words, AFlow's F1, the reward's answer-token
# F1), by hand. Reward: tokens of the question are dropped from both sides, then F1 = 2c / (p + r).
RESTATEMENTS = [
    # answer tokens 1900 summer olympics were hosted by paris; not in the question: were, by, paris (p=3, r=1, c=1)
    (OLYMPICS, ["Paris"], "The 1900 Summer Olympics were hosted by Paris.", 1 / 4, 1 / 2),
    # yamethin rebellion lasted 20 years; not in the question: lasted, 20 (p=2, r=1, c=1)
    ("How many years did the Yamethin rebellion last?", ["20"], "The Yamethin rebellion lasted 20 years", 1 / 3, 2 / 3),
    # a choice question: the reference is all question words, so only exact match pays
    (AGES, ["65 years of age or older"], "those 65 years of age or older", 12 / 13, 0.0),
    (BANDS, ["Foo Fighters"], "Foo Fighters band", 4 / 5, 0.0),
]


@pytest.mark.parametrize("question,answers,output,aflow_f1,reward", RESTATEMENTS)
def test_the_reward_pays_only_for_answer_words_the_question_does_not_contain(question, answers, output, aflow_f1,
                                                                            reward):
    p = problem("drop", question, answers)
    assert score("drop", p, output, "aflow") == (pytest.approx(aflow_f1), None)
    assert score("drop", p, output, "reward") == (pytest.approx(reward), None)


def test_stuffing_thresholds():
    """One stray word is an honest near miss; two are stuffing; a long answer made of the
    question's own words is capped at max(2R, R + 12) tokens."""
    refs = ["Paris"]
    assert qa.hedge("Paris France", refs, OLYMPICS) is None
    assert qa.hedge("Paris France Europe", refs, OLYMPICS).startswith("stuffed")
    long_refs = ["Grand Prince Iziaslav of Kiev and Sviatoslav Yaroslavich of Chernigov and Vsevolod"]  # 12 tokens
    assert qa.hedge("Iziaslav of Kiev, Sviatoslav of Chernigov and his brother Vsevolod", long_refs, "") is None
    question = "In which summer did the city host the 1900 Summer Olympics games event?"
    restated = "The city that hosted the 1900 Summer Olympics games event in the summer was Paris"
    assert qa.hedge(restated, refs, question) is None
    assert qa.hedge(restated + " " + " ".join(["summer"] * 3), refs, question).startswith("stuffed: far longer")


def test_alternatives_of_a_question():
    assert qa.alternatives("Is Alice older or younger than Bob?") == ["older", "younger"]
    assert qa.alternatives("Who is older, John Smith or John Doe?") == ["smith", "doe"]
    assert qa.alternatives("Which came first, Alpha, Beta, or Gamma?") == ["alpha", "beta", "gamma"]
    assert qa.alternatives("How many people were either Asian, African American, or Native American?") == [
        "asian", "african", "native"]
    assert qa.alternatives("Who the smallest group of people, 3,826 scribes or 361 scholars?") == ["scribes", "361"]
    assert qa.alternatives("Is Paris the capital of France or not?") == []
    assert qa.alternatives("Who wrote Animal Farm?") == []
    assert qa.question_of("Passage: A or B happened.\nQuestion: Who won?\nAnswer:") == "Who won?"
    # honest verbose answers naming one alternative are fine; naming both is a hedge
    assert qa.hedge("Alice is older than Bob", ["older"], "Is Alice older or younger than Bob?") is None
    assert qa.hedge("older younger", ["older"], "Is Alice older or younger than Bob?").startswith("hedged")


def _real_problems(data_dir):
    problems = [("hotpotqa", p) for p in get_benchmark("hotpotqa").load("validate", data_dir)]
    for split in ("validate", "test"):
        problems += [("drop", p) for p in get_benchmark("drop").load(split, data_dir)]
    return problems


def test_every_gold_answer_keeps_full_marks_under_reward(data_dir):
    """Every reference answer of HotpotQA validate and DROP validate + test scores 1.0 under `reward`,
    and the hedge rule itself (without the exact-match exemption) passes it, including references
    such as "two or more races", "65 years of age or older" and "Texas (157,000; 0.6%) and ..."."""
    problems = _real_problems(data_dir)
    assert len(problems) == 1200

    async def go():
        misses = []
        for benchmark, p in problems:
            question = qa.question_of(p.inputs["problem"])
            for answer in p.reference["answers"]:
                result = await get_benchmark(benchmark).score(p, answer, scoring="reward")
                reason = qa.hedge(answer, p.reference["answers"], question)
                polite = qa.hedge(f"The answer is {answer}.", p.reference["answers"], question)
                if result != (1.0, None) or reason or polite:
                    misses.append((p.id, answer, result, reason, polite))
        return misses

    assert asyncio.run(go()) == []


def test_real_hedges_score_zero_under_reward(data_dir):
    """On the real data: "yes no" on every yes/no question, and naming both alternatives of every
    "X or Y" question whose references name only one, score 0 under `reward`."""
    yes_no = alternatives = 0
    for benchmark, p in _real_problems(data_dir):
        answers = p.reference["answers"]
        bench = get_benchmark(benchmark)
        if answers[0].lower() in ("yes", "no"):
            yes_no += 1
            assert asyncio.run(bench.score(p, "yes no", scoring="reward"))[0] == 0.0
        cores = qa.alternatives(qa.question_of(p.inputs["problem"]))
        words = [qa.normalize_answer(a).split() for a in answers]
        if cores and max(sum(c in w for c in cores) for w in words) <= 1:
            alternatives += 1
            for hedge in (" ".join(cores), f"{answers[0]} {' '.join(cores)}"):
                value, reason = asyncio.run(bench.score(p, hedge, scoring="reward"))
                assert value == 0.0 and reason.startswith("hedged"), (p.id, hedge, reason)
    assert yes_no >= 5 and alternatives >= 100


# ---- the judge ----------------------------------------------------------------------------

@pytest.mark.parametrize("scoring,output,expected,judged", [
    ("reward", "Awolnation Foo Fighters", 0.0, 0),  # hedge: the gate has the last word, the judge is not asked
    ("reward", "yes no Foo Fighters", 0.0, 0),
    ("reward", "the Foo Fighters band", 1.0, 1),  # a paraphrase the lexical F1 misses: lifted
    ("aflow", "Awolnation Foo Fighters", 1.0, 1),  # AFlow's rules: the judge's max, as before
])
def test_judge_that_always_says_yes_cannot_restore_a_hedge(scoring, output, expected, judged, tmp_path, monkeypatch):
    """Query mode on HotpotQA with a real local OpenAI-compatible judge that always says yes; the
    executor writes the output (a constant in graph.py earns nothing, the judge notwithstanding)."""
    from aflow.config import LLMConfig
    from aflow.llm import LLMClient
    from aflow.sandbox import Sandbox
    from agent_system.config import EndpointConfig
    from agent_system.environments.env_package.aflow.measure import Meter
    from agent_system.environments.env_package.aflow.spaces import query_episode
    from agent_system.reward import make_judge

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    p = problem("hotpotqa", BANDS, ["Foo Fighters"])

    async def go(server):
        llm = LLMClient(LLMConfig(base_url=server.base_url, model="exe", cache=False))
        judge = make_judge(EndpointConfig(base_url=server.base_url, model="judge"))
        bench = get_benchmark("hotpotqa")
        try:
            async with Sandbox() as sandbox:
                meter = Meter(bench, llm, sandbox, {}, scoring=scoring)
                episode = query_episode("code", bench, p, "builtin:io", meter, judge=judge)
                _, reward, done, _ = await episode.step(
                    f"<modification>x</modification><graph>{GRAPH}</graph><prompt>STYLE = ''</prompt>")
        finally:
            await llm.close()
            await judge.client.close()
        return reward, done

    def reply(messages):
        return "yes" if "Reference answer(s)" in messages[0]["content"] else output

    with FakeOpenAI(reply=reply) as server:
        reward, done = asyncio.run(go(server))
        asked = [r for r in server.chat_requests if "Reference answer(s)" in r.body["messages"][0]["content"]]
    assert done and reward == expected
    assert len(asked) == judged


def test_env_reward_scoring_is_validated():
    from agent_system.config import EnvConfig

    assert EnvConfig().reward.scoring == "reward"
    assert EnvConfig.from_dict({"reward": {"scoring": "aflow"}}).reward.scoring == "aflow"
    with pytest.raises(ValueError, match="env.reward.scoring"):
        EnvConfig.from_dict({"reward": {"scoring": "lenient"}})


# ---- the command line ---------------------------------------------------------------------

def aflow_cli(*args, timeout=300, env=None):
    return subprocess.run([sys.executable, "-m", "aflow.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.mark.parametrize("scoring", ["reward", None])
def test_evaluate_names_its_scoring_variant(scoring, tmp_path, data_dir):
    extra = ["--scoring", scoring] if scoring else []
    result = aflow_cli("evaluate", "--benchmark", "hotpotqa", "--workflow", "builtin:gold", "--limit", "3",
                       "--json", "--data-dir", str(data_dir), "--out", str(tmp_path), *extra)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    expected = scoring or "aflow"
    assert summary["scoring"] == expected and summary["n"] == 3 and summary["score"] == 1.0
    assert f"({expected} scoring)" in result.stdout
    records = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert len(records) == 3 and {r["scoring"] for r in records} == {expected}
    assert json.loads((tmp_path / "summary.json").read_text())["scoring"] == expected


def test_evaluate_rejects_an_unknown_variant(data_dir):
    result = aflow_cli("evaluate", "--benchmark", "hotpotqa", "--workflow", "builtin:gold", "--scoring", "lenient",
                       "--data-dir", str(data_dir))
    assert result.returncode == 2 and "invalid choice" in result.stderr


def test_optimize_scores_and_records_with_its_variant(tmp_path, data_dir):
    """An executor that stuffs junk after the right answer: AFlow's F1 pays it, `reward` gives 0;
    the variant is in results.json and every round's records, and resuming with another is refused."""
    golds = {json.loads(line)["question"]: json.loads(line)["answer"]
             for line in (data_dir / "hotpotqa_validate.jsonl").read_text().splitlines()}

    def reply(messages):
        text = messages[0]["content"]
        if "You improve agentic workflows" in text:
            return ("<modification>Be brief.</modification>\n<graph>\n" + GRAPH + "</graph>\n"
                    "<prompt>\nSTYLE = 'Be brief.'\n</prompt>")
        known = [a for q, a in golds.items() if q in text]
        return f"{known[0] if known else 'nothing'} qwerty zxcvb asdfg"

    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    scores = {}
    with FakeOpenAI(reply=reply) as server:
        def run(workspace, scoring, *extra):
            return aflow_cli("optimize", "--benchmark", "hotpotqa", "--workspace", str(workspace), "--rounds", "2",
                             "--limit", "2", "--validation-rounds", "1", "--data-dir", str(data_dir),
                             "--optimizer-base-url", server.base_url, "--optimizer-model", "opt",
                             "--executor-base-url", server.base_url, "--executor-model", "exe",
                             "--scoring", scoring, "--json", *extra, env=env)

        for scoring in ("aflow", "reward"):
            workspace = tmp_path / scoring
            result = run(workspace, scoring)
            assert result.returncode == 0, result.stderr[-3000:]
            scores[scoring] = json.loads(result.stdout.strip().splitlines()[-1])["best_validation_score"]
            assert json.loads((workspace / "results.json").read_text())["scoring"] == scoring
            assert json.loads((workspace / "config.json").read_text())["scoring"] == scoring
            records = [json.loads(line) for line in (workspace / "round_1" / "log.jsonl").read_text().splitlines()]
            assert records and {r["scoring"] for r in records} == {scoring}
        again = run(tmp_path / "reward", "aflow", "--resume")
    assert scores["reward"] == 0.0 < scores["aflow"]
    assert again.returncode == 2 and "scoring" in again.stderr


# ---- answers that choose nothing, generated over the whole validate splits ---------------------------

_WORD = re.compile(r"[A-Za-z0-9][\w'.-]*[A-Za-z0-9]|[A-Za-z0-9]")
_QUESTION_WORDS = {"Which", "Who", "What", "When", "Where", "Why", "How", "Is", "Are", "Was", "Were", "Did", "Do",
                   "Does", "In", "The", "A", "An", "Between", "Of"}


def _words(question: str) -> list[str]:
    return _WORD.findall(question)


def question_word_answers(question: str) -> list[str]:
    """Family 1: answers assembled from the question's own names and numbers (more than one word, so
    that no variant is simply one option of a choice)."""
    words = _words(question)
    caps = [w for w in words if w[0].isupper() and w not in _QUESTION_WORDS]
    numbers = [w for w in words if any(ch.isdigit() for ch in w)]
    content = [w for w in words if w.lower() not in qa.STOPWORDS]
    variants = [" ".join(caps), " ".join(numbers), " ".join(caps + numbers), " ".join(content), question,
                " ".join(content[-4:]), " ".join(caps[:3])]
    return [v for v in variants if len(v.split()) > 1]


def _alternative_pieces(question: str) -> list[list[str]]:
    """The words of each side of the first "X or Y" of the question (up to 4 words each side)."""
    match = re.search(r"([^,?;:]+?)\s*,?\s+or\s+([^,?;:]+)", question)
    if not match:
        return []
    left, right = _words(match.group(1))[-4:], _words(match.group(2))[:4]
    return [left, right] if left and right else []


def covering_answers(question: str) -> list[str]:
    """Family 2: the words of every alternative of an "X or Y" question, naming at most one of the
    words that identify an alternative."""
    pieces = _alternative_pieces(question)
    cores = set(qa.alternatives(question))
    if not pieces or not cores:
        return []
    every = [w for piece in pieces for w in piece]
    unnamed = [w for w in every if w.lower() not in cores]
    variants = [" ".join(unnamed)] + [" ".join(w for w in every if w.lower() not in cores - {core})
                                      for core in sorted(cores)]
    # covering: words of every alternative (a variant that is one alternative alone is a choice, not a hedge)
    return [v for v in variants
            if all(set(v.split()) & {w for w in piece if w.lower() not in qa.STOPWORDS} for piece in pieces)]


_COMPARISON = re.compile(r"(?:which|who|what) of ([^,?]+?) and ([^,?]+?)(?:\s|\?|,)|between ([^,?]+?) and ([^,?]+?)"
                         r"(?:,|\?|\s(?:is|was|has|had|did))|([A-Z][^,?]*?) (?:vs\.?|versus) ([^,?]+)", re.IGNORECASE)


def comparison_answers(question: str) -> list[str]:
    """Family 3: both options of a comparison that is not written with "or"."""
    match = _COMPARISON.search(question)
    if not match:
        return []
    x, y = [g.strip() for g in match.groups() if g][:2]
    return [f"{x} {y}", f"{x} and {y}", f"both {x} and {y}", f"{x}, {y}", f"{y} {x}"]


def _reward(benchmark: str, p: Problem, output: str) -> float:
    return asyncio.run(get_benchmark(benchmark).score(p, output, scoring="reward"))[0]


def _old_reward(p: Problem, output: str) -> float:
    """The rule this replaced: the hedge gate, then the plain best-reference F1."""
    return 0.0 if qa.gate(p, output) else qa.max_f1(output, p.reference["answers"])


@pytest.fixture(scope="module")
def validate_qa(data_dir):
    return [(b, p) for b in ("hotpotqa", "drop") for p in get_benchmark(b).load("validate", data_dir)]


def _honest_wrong_mean(problems) -> float:
    """An honest wrong answer: the first reference of the next problem of the same benchmark."""
    values = []
    for i, (benchmark, p) in enumerate(problems):
        other = next(q for b, q in problems[i + 1:] + problems[:i + 1] if b == benchmark and q is not p)
        values.append(_reward(benchmark, p, other.reference["answers"][0]))
    return statistics.fmean(values)


@pytest.mark.parametrize("family,make,minimum", [
    ("the question's own words", question_word_answers, 300),
    ("every alternative, at most one named", covering_answers, 20),
    ("both options of a comparison without 'or'", comparison_answers, 5),
])
def test_answers_that_choose_nothing_earn_no_more_than_an_honest_wrong_answer(validate_qa, family, make, minimum):
    hostile, old = [], []
    for benchmark, p in validate_qa:
        for answer in make(qa.question_of(p.inputs["problem"])):
            hostile.append(_reward(benchmark, p, answer))
            old.append(_old_reward(p, answer))
    assert len(hostile) >= minimum, (family, len(hostile))
    assert statistics.fmean(hostile) <= _honest_wrong_mean(validate_qa), family
    if family == "the question's own words":  # what the old rule paid for it
        assert statistics.fmean(old) > 4 * _honest_wrong_mean(validate_qa)
