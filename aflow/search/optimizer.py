"""The search loop: select a node, ask the optimizer for a modification, evaluate it, record.

Round 1 evaluates the initial workflow. Every later round selects a parent (AFlow's rule or
UCB, optionally fused with a value provider), asks the optimizer model for one modification
(retrying with the rejection reason up to `max_retries` times), evaluates the new workflow
`validation_rounds` times on the validation split, and records node, experience and files.
It stops at `rounds`, or when the mean of the top 3 has not changed by more than
`convergence_tolerance` for `convergence_rounds` rounds (AFlow's criterion).
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from aflow.benchmarks import get_benchmark
from aflow.config import EvalConfig
from aflow.evaluate import evaluate
from aflow.llm import ExecutorError, LLMCallError, LLMClient, Usage
from aflow.search.experience import Experience, ExperiencePool
from aflow.search.projection import normalize_modification, project
from aflow.search.prompts import optimizer_prompt
from aflow.search.selection import SelectionConfig, select
from aflow.search.tree import Node, Tree
from aflow.search.value import ModelValue, empirical
from aflow.search.workspace import Workspace
from aflow.workflows import load_workflow


@dataclass
class SearchConfig:
    benchmark: str
    workspace: Path
    rounds: int = 10
    validation_rounds: int = 3
    limit: int | None = None
    data_dir: Path | None = None
    concurrency: int = 8
    initial_workflow: str = "builtin:io"
    max_retries: int = 3
    convergence_rounds: int = 5
    convergence_tolerance: float = 0.0
    seed: int = 0
    value_provider: str = "none"  # none | empirical | model
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    scoring: str = "aflow"  # aflow.benchmarks.SCORING_VARIANTS; scores of different variants never mix

    def fingerprint(self) -> dict:
        return {"benchmark": self.benchmark, "validation_rounds": self.validation_rounds, "limit": self.limit,
                "seed": self.seed, "selection": self.selection.rule, "value_provider": self.value_provider,
                "value_weight": self.selection.value_weight, "initial_workflow": self.initial_workflow,
                "scoring": self.scoring}


@dataclass
class SearchResult:
    rounds_done: int
    best_round: int
    best_validation_score: float
    total_cost_usd: float
    calls: int
    wall_s: float
    converged: bool
    test_score: float | None = None


class Search:
    def __init__(self, config: SearchConfig, executor: LLMClient, optimizer: LLMClient,
                 value_llm: LLMClient | None = None, log=None):
        self.config = config
        self.executor = executor
        self.optimizer = optimizer
        self.workspace = Workspace(config.workspace)
        self.pool = ExperiencePool(self.workspace.root / "experience.sqlite", scope=config.benchmark)
        self.tree = Tree()
        self.rng = np.random.RandomState(config.seed)
        self.history: list[float] = []  # mean of the top 3 after each round
        self.usage = Usage()
        self.log = log or (lambda text: print(text, file=sys.stderr, flush=True))
        self.model_value = ModelValue(value_llm) if config.value_provider == "model" and value_llm else None
        if config.value_provider == "model" and value_llm is None:
            raise ExecutorError("--value-provider model needs an endpoint (the optimizer's is used by default)")

    # ---- state -------------------------------------------------------------------

    def _restore(self, resume: bool) -> int:
        self.workspace.start({**self.config.fingerprint(), "rounds": self.config.rounds}, resume)
        removed = self.workspace.discard_unfinished()
        if removed:
            self.log(f"resume: discarded unfinished {', '.join(removed)}")
        results = self.workspace.read_results()
        done = self.workspace.done_rounds()
        for number in done:
            node, _ = self.workspace.load_round(number)
            if node:
                node.visits = int(results.get("visits", {}).get(str(number), 0))
                self.tree.add(node)
        self.history = list(results.get("top3_history", []))[: len(done)]
        totals = results.get("totals", {})
        self.usage = Usage(**{k: totals.get(k, 0) for k in asdict(Usage())})
        if "rng_state" in results:
            state = results["rng_state"]
            self.rng.set_state((state[0], np.array(state[1], dtype=np.uint32), *state[2:]))
        if done:
            self.log(f"resume: {len(done)} round(s) done, continuing at round {done[-1] + 1}")
        return done[-1] if done else 0

    def _save(self, rounds_done: int, converged: bool) -> None:
        state = self.rng.get_state()
        best = self.tree.best() if self.tree.nodes else None
        self.workspace.write_results({
            "benchmark": self.config.benchmark,
            "scoring": self.config.scoring,
            "rounds_done": rounds_done,
            "converged": converged,
            "best_round": best.round if best else None,
            "best_validation_score": best.mean if best else None,
            "rounds": [n.summary() for n in sorted(self.tree.nodes.values(), key=lambda n: n.round)],
            "visits": {str(n.round): n.visits for n in self.tree.nodes.values()},
            "top3_history": self.history,
            "totals": asdict(self.usage),
            "rng_state": [state[0], state[1].tolist(), *state[2:]],
        })
        self.workspace.write_experience(self.pool.export_jsonl())

    # ---- evaluation --------------------------------------------------------------

    async def _evaluate(self, number: int, graph: str, prompt: str) -> tuple[list[float], list[dict], Usage]:
        directory = self.workspace.write_workflow(number, graph, prompt)
        scores, records, spent = [], [], Usage()
        for run in range(self.config.validation_rounds):
            config = EvalConfig(benchmark=self.config.benchmark, split="validate", workflow=str(directory),
                                limit=self.config.limit, concurrency=self.config.concurrency,
                                data_dir=self.config.data_dir, scoring=self.config.scoring)
            summary, run_records = await evaluate(config, self.executor, progress=False)
            if run_records and all(r.error for r in run_records):
                await self.executor.check()  # a dead executor is a set-up error, not a score of 0
            scores.append(summary.score)
            records += [{**asdict(r), "run": run} for r in run_records]
            spent.add(Usage(calls=summary.calls, cached=summary.cached_calls, prompt_tokens=summary.prompt_tokens,
                            completion_tokens=summary.completion_tokens, cost_usd=summary.cost_usd))
        return scores, records, spent

    # ---- one round ---------------------------------------------------------------

    async def _initial_round(self) -> None:
        seed = load_workflow(self.config.initial_workflow)
        scores, records, spent = await self._evaluate(1, seed.graph, seed.prompt)
        node = Node(round=1, graph=seed.graph, prompt=seed.prompt, modification="initial workflow",
                    scores=scores, cost_usd=spent.cost_usd, calls=spent.calls)
        self.usage.add(spent)
        self.tree.add(node)
        self.workspace.commit_round(node, 1, records, {"status": "evaluated"})

    async def _expansion_round(self, number: int) -> None:
        if self.model_value:
            await self.model_value.prefetch(list(self.tree.nodes.values()))
        value = self.model_value or (empirical(self.pool) if self.config.value_provider == "empirical" else None)
        parent, why = select(self.tree, self.config.selection, self.rng, value)
        parent.visits += 1
        tried = {normalize_modification(e.modification) for e in self.pool.of_parent(parent.round)}
        prompt_text = optimizer_prompt(self.config.benchmark, parent.graph, parent.prompt, parent.mean,
                                       self.pool.of_parent(parent.round), self.workspace.failures(parent.round),
                                       get_benchmark(self.config.benchmark).is_code)
        reasons = []
        for attempt in range(1, self.config.max_retries + 1):
            messages = [{"role": "user", "content": prompt_text}]
            if reasons:
                messages.append({"role": "user", "content": f"Your previous answer was rejected: {reasons[-1]}. "
                                                            "Answer again in the required format."})
            try:
                answer = await self.optimizer.chat(messages, usage=self.usage)
            except LLMCallError as exc:
                raise ExecutorError(f"optimizer failed: {exc}") from exc
            action = project(answer.text, parent.graph, parent.prompt, tried)
            self.workspace.log_expansion({"round": number, "parent": parent.round, "attempt": attempt,
                                          "valid": action.is_valid, "reason": action.reason,
                                          "modification": action.modification, "selection": why,
                                          "answer": answer.text[:20000]})
            if action.is_valid:
                break
            reasons.append(action.reason)
            self.log(f"round {number}: expansion {attempt}/{self.config.max_retries} rejected: {action.reason}")
        else:
            self.workspace.commit_round(None, number, [], {"status": "rejected", "parent": parent.round,
                                                           "reasons": reasons})
            return
        scores, records, spent = await self._evaluate(number, action.workflow.graph, action.workflow.prompt)
        node = Node(round=number, graph=action.workflow.graph, prompt=action.workflow.prompt, parent=parent.round,
                    modification=action.modification, scores=scores, cost_usd=spent.cost_usd, calls=spent.calls)
        self.usage.add(spent)
        self.tree.add(node)
        self.pool.add(Experience(parent.round, number, action.modification, parent.mean, node.mean))
        self.workspace.commit_round(node, number, records, {"status": "evaluated"})

    def _converged(self) -> bool:
        n = self.config.convergence_rounds
        if n <= 0 or len(self.history) <= n:
            return False
        recent = self.history[-(n + 1):]
        return all(abs(b - a) <= self.config.convergence_tolerance for a, b in zip(recent, recent[1:], strict=False))

    # ---- the loop ----------------------------------------------------------------

    async def run(self, resume: bool = False) -> SearchResult:
        started = time.monotonic()
        await self.executor.check("executor")
        await self.optimizer.check("optimizer")
        last = self._restore(resume)
        converged = self._converged()
        for number in range(last + 1, self.config.rounds + 1):
            if converged:
                break
            if number == 1:
                await self._initial_round()
            else:
                await self._expansion_round(number)
            self.history.append(self.tree.top_mean(3))
            converged = self._converged()
            self._save(number, converged)
            best = self.tree.best()
            node = self.tree.nodes.get(number)
            status = f"score {node.mean:.4f} ± {node.std:.4f} (from round {node.parent})" if node else "no valid expansion"
            self.log(f"round {number}/{self.config.rounds}: {status}; best {best.mean:.4f} at round {best.round}; "
                     f"${self.usage.cost_usd:.4f}, {self.usage.calls} calls" + ("; converged" if converged else ""))
        best = self.tree.best()
        return SearchResult(rounds_done=max(self.workspace.done_rounds(), default=0), best_round=best.round,
                            best_validation_score=best.mean, total_cost_usd=round(self.usage.cost_usd, 6),
                            calls=self.usage.calls, wall_s=round(time.monotonic() - started, 3), converged=converged)
