"""Episode reward: the environment's return plus shaping terms whose weights live in `env.reward`.

    total = return − format_penalty·(invalid actions) − cost_penalty·(executor USD)
            − token_penalty·(executor tokens / 1000) + variety_weight·(distinct operators in the final workflow)
            [+ diversity_weight·(how much the final workflow differs from its group's), batch-level]

Task mode's return is the sum of step rewards (each the proposal's credit minus its parent's, paired
on a fresh sample); query mode's is the credit of the workflow that ran (code space) or of the final
canvas (canvas space). Credit is what the executor made (environments/env_package/aflow/measure.py).
Tokens count cache hits too: a cached answer is free to this run, not to the policy's next one, and a
self-hosted executor has no listed price.
Every shaping weight defaults to 0 except the format penalty. The group diversity term needs the whole GRPO group, so it is computed over the
batch (`group_diversity_bonus`) rather than per episode.
"""

from __future__ import annotations

import ast
from collections import defaultdict

from aflow.parsing import PARSE_ERRORS
from agent_system.config import RewardConfig


def operators_used(graph: str) -> set[str]:
    """Operator classes a workflow imports from aflow_ops (or AFlow's `operator.X(...)`)."""
    from aflow.operators import OPERATOR_NAMES

    try:
        tree = ast.parse(graph)
    except PARSE_ERRORS:
        return set()
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "aflow_ops":
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.Attribute) and node.attr in OPERATOR_NAMES:
            names.add(node.attr)
    return names & set(OPERATOR_NAMES)


def step_penalty(info: dict, cfg: RewardConfig) -> float:
    """The penalty of one turn, charged at its own step by workflow-GiGPO (agent_system.advantage):
    the same format penalty the episode return carries for each invalid action."""
    return 0.0 if info.get("valid") else float(cfg.format_penalty)


def episode_reward(summary: dict, cfg: RewardConfig) -> tuple[float, dict[str, float]]:
    """(total reward, its components) for one finished episode summary (see worker.outcome_summary)."""
    turns = summary.get("turns", [])
    # the sum of step rewards in both modes: in query mode only the scoring turn has one (the code space's one
    # workflow that ran; the canvas space's last turn, which runs the final canvas even when it was rejected)
    ret = sum(t["reward"] for t in turns)
    invalid = sum(not t["valid"] for t in turns)
    components = {
        "return": float(ret),
        "format": -cfg.format_penalty * invalid,
        "cost": -cfg.cost_penalty * float(summary.get("cost_usd", 0.0)),
        "tokens": -cfg.token_penalty * float(summary.get("tokens", 0)) / 1000,
        "variety": cfg.variety_weight * len(operators_used(summary.get("final_graph", ""))),
    }
    return sum(components.values()), components


def group_diversity_bonus(signatures: list[frozenset[str]], uids: list[str], weight: float) -> list[float]:
    """WA-GRPO-style diversity: for each episode, `weight` × the mean Jaccard distance between
    its final workflow's operator set and those of the other episodes with the same uid."""
    if weight == 0:
        return [0.0] * len(signatures)
    groups: dict[str, list[int]] = defaultdict(list)
    for i, uid in enumerate(uids):
        groups[uid].append(i)
    bonus = [0.0] * len(signatures)
    for members in groups.values():
        for i in members:
            others = [j for j in members if j != i]
            if not others:
                continue
            distances = []
            for j in others:
                union = signatures[i] | signatures[j]
                distances.append(1.0 - len(signatures[i] & signatures[j]) / len(union) if union else 0.0)
            bonus[i] = weight * sum(distances) / len(distances)
    return bonus


JUDGE_PROMPT = """Question and context:
{question}

Reference answer(s): {references}
Candidate answer: {candidate}

Does the candidate answer mean the same as a reference answer? A candidate that offers several
answers, alternatives or both yes and no does not. Reply with exactly yes or no."""

QA_BENCHMARKS = ("hotpotqa", "drop")


def make_judge(endpoint, llm_factory=None):
    """An async judge for QA answers through an OpenAI-compatible endpoint (config env.reward.judge):
    1.0 when it says the candidate matches a reference, else 0.0; a failed call counts as 0.0.
    It only ever lifts a lexical score; under `reward` scoring the hedge gate overrides it (Episode)."""
    from aflow.config import LLMConfig
    from aflow.llm import LLMCallError, LLMClient

    client = (llm_factory or LLMClient)(LLMConfig(base_url=endpoint.base_url, model=endpoint.model,
                                                  api_key_env=endpoint.api_key_env, max_tokens=4))

    async def judge(problem, output) -> float:
        prompt = JUDGE_PROMPT.format(question=str(problem.inputs.get("problem", ""))[-3000:],
                                     references=" | ".join(problem.reference.get("answers", [])),
                                     candidate=str(output)[:1000])
        try:
            reply = await client.chat([{"role": "user", "content": prompt}])
        except LLMCallError:
            return 0.0
        return 1.0 if reply.text.strip().lower().startswith("yes") else 0.0

    judge.client = client
    return judge
