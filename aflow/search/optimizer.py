"""The search loop: select a node, ask the optimizer for a modification, evaluate it, record.

Round 1 evaluates the initial workflow. Every later round selects a parent (AFlow's rule or
UCB, optionally fused with a value provider), asks the optimizer model for one modification
(retrying with the rejection reason up to `max_retries` times), evaluates the new workflow
`validation_rounds` times on the validation split, and records node, experience and files.
It stops at `rounds`, or when the mean of the top 3 has not changed by more than
`convergence_tolerance` for `convergence_rounds` rounds (AFlow's criterion).

Two action spaces (`action_space`): "code", where the optimizer rewrites graph.py and prompt.py
(AFlow's), and "canvas", where it answers one canvas edit (`aflow.canvas`, e.g. `ENSEMBLE 1 3`)
applied to the parent's canvas (recovered from its files by `canvas_of`). A canvas round is
recorded like any other: its files are the compiled canvas, an ordinary native workflow, and its
modification is the action line, so the tree, the report and the experience pool do not change.

Repeated validation runs are independent samples: run 1 asks the executor at its own
temperature (0 by default: the deterministic, cached answer `aflow evaluate` gets); runs 2..K
sample at `validation_temperature` with a seed of their own (from --seed, the round and the
run). Temperature and seed are request parameters, so they are part of the response-cache key:
a repeat run is never answered with run 1's cached answer, yet re-running the same search
(same seed) is reproducible and is answered from the cache.
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from aflow.benchmarks import get_benchmark
from aflow.canvas import canvas_of, compile_canvas, initial
from aflow.config import EvalConfig
from aflow.evaluate import evaluate
from aflow.llm import ExecutorError, LLMCallError, LLMClient, Usage
from aflow.search.experience import Experience, ExperiencePool
from aflow.search.projection import (
    CanvasMove,
    normalize_modification,
    project,
    project_canvas,
    rejection_kind,
    tried_canvases,
)
from aflow.search.prompts import canvas_optimizer_prompt, optimizer_prompt
from aflow.search.selection import SelectionConfig, select
from aflow.search.tree import Node, Tree
from aflow.search.value import ModelValue, empirical
from aflow.search.workspace import Workspace, WorkspaceMismatch
from aflow.workflows import WorkflowCode, load_workflow

ACTION_SPACES = ("code", "canvas")
DEFAULT_INITIAL = {"code": "builtin:io", "canvas": "canvas:initial"}  # canvas: initial(), chain of thought
FINISH_REASON = "FINISH is not an edit: propose one edit"


class InitialWorkflowError(ValueError):
    """An --initial-workflow the action space cannot start from (a set-up error)."""


@dataclass
class SearchConfig:
    benchmark: str
    workspace: Path
    rounds: int = 10
    validation_rounds: int = 3
    limit: int | None = None
    data_dir: Path | None = None
    concurrency: int = 8
    initial_workflow: str | None = None  # None: DEFAULT_INITIAL of the action space
    max_retries: int = 3
    convergence_rounds: int = 5
    convergence_tolerance: float = 0.0
    seed: int = 0
    value_provider: str = "none"  # none | empirical | model
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    scoring: str = "aflow"  # aflow.benchmarks.SCORING_VARIANTS; scores of different variants never mix
    validation_temperature: float = 0.7  # executor temperature of validation runs 2..K (run 1: the executor's)
    sample_temperature: float = 0.7  # repeats of a request within one workflow run (aflow.operators.CallPolicy)
    action_space: str = "code"  # ACTION_SPACES: what the optimizer answers (whole files, or one canvas edit)
    optimizer_policy: dict | None = None  # a trained policy as the optimizer: its provenance (config.json records it)

    def __post_init__(self):
        if self.action_space not in ACTION_SPACES:
            raise ValueError(f"unknown action space {self.action_space!r} (choose from: {', '.join(ACTION_SPACES)})")
        self.initial_workflow = self.initial_workflow or DEFAULT_INITIAL[self.action_space]

    def fingerprint(self) -> dict:
        return {"benchmark": self.benchmark, "validation_rounds": self.validation_rounds, "limit": self.limit,
                "seed": self.seed, "selection": self.selection.rule, "value_provider": self.value_provider,
                "value_weight": self.selection.value_weight, "initial_workflow": self.initial_workflow,
                "scoring": self.scoring, "validation_temperature": self.validation_temperature,
                "action_space": self.action_space, "sample_temperature": self.sample_temperature}


def initial_workflow(benchmark: str, spec: str, action_space: str) -> WorkflowCode:
    """Round 1's workflow. A canvas search can only start from a canvas, since every later round edits
    its parent's canvas: the initial one (DEFAULT_INITIAL) or a directory holding a compiled canvas of
    the benchmark's family (a round of an earlier canvas search). Raises InitialWorkflowError, or
    load_workflow's errors, before any model is asked."""
    if action_space == "code":
        return load_workflow(spec)
    code = get_benchmark(benchmark).is_code
    if spec == DEFAULT_INITIAL["canvas"]:
        return WorkflowCode(spec, *compile_canvas(initial(code), code))
    seed = load_workflow(spec)
    found = canvas_of(seed.graph, seed.prompt)
    if found is None:
        raise InitialWorkflowError(f"--action-space canvas starts from a canvas: --initial-workflow {spec} is not a "
                                   f"compiled canvas (leave it out for the initial canvas, or give a round "
                                   f"directory of a canvas search)")
    if found.code != code:
        raise InitialWorkflowError(f"--initial-workflow {spec} is a canvas for "
                                   f"{'code' if found.code else 'answer'} benchmarks, not for {benchmark}")
    return seed


def search_move(move: CanvasMove) -> CanvasMove:
    """A canvas answer as a search round judges it: FINISH ends an RL episode, but a search round
    exists to try one new workflow, so it is a rejected answer (retried with the reason)."""
    if move.finish:
        return CanvasMove(move.modification, move.canvas, False, FINISH_REASON)
    return move


@dataclass
class SearchResult:
    rounds_done: int
    best_round: int
    best_validation_score: float
    total_cost_usd: float
    calls: int
    wall_s: float
    converged: bool
    cached_calls: int = 0  # answered from the response cache (not in `calls`)
    test_score: float | None = None


class SampledExecutor:
    """The executor asked at another temperature with a fixed seed (validation runs 2..K).
    Both are request parameters, hence part of the response-cache key."""

    def __init__(self, llm: LLMClient, temperature: float, seed: int):
        self.llm, self.temperature, self.seed = llm, temperature, seed
        self.config = llm.config

    async def chat(self, messages, usage=None, **overrides):
        # a repeated request within the run (CallPolicy: seed k) keeps this run's own seed, offset by k
        repeat = overrides.pop("seed", 0)
        return await self.llm.chat(messages, usage=usage, **{**overrides, "temperature": self.temperature,
                                                            "seed": self.seed * 1_000_003 + repeat if repeat else self.seed})

    async def check(self, *args, **kwargs):
        return await self.llm.check(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.llm, name)


def validation_seed(seed: int, round_: int, run: int) -> int:
    """Seed of validation run `run` (0-based, ≥ 1) of round `round_`: distinct per round and run."""
    return (seed * 1_000_003 + round_ * 1_009 + run) % 2**31


class Search:
    def __init__(self, config: SearchConfig, executor: LLMClient, optimizer: LLMClient,
                 value_llm: LLMClient | None = None, log=None, progress: bool = False, on_round=None):
        self.config = config
        self.on_round = on_round  # called with (round, metrics) after each round is saved (aflow.tracking)
        self.progress = progress  # a progress bar per validation run (stderr)
        self.executor = executor
        self.optimizer = optimizer
        self.workspace = Workspace(config.workspace)
        self.pool = ExperiencePool(self.workspace.root / "experience.sqlite", scope=config.benchmark)
        self.tree = Tree()
        self.rng = np.random.RandomState(config.seed)
        self.history: list[float] = []  # mean of the top 3 after each round
        self.rejected: dict[int, dict] = {}  # rounds whose expansions were all rejected: parent, reasons
        self.round_info: dict[int, dict] = {}  # per round: status, wall seconds, calls/cost of the round
        self.usage = Usage()
        self.log = log or (lambda text: print(text, file=sys.stderr, flush=True))
        self.model_value = ModelValue(value_llm) if config.value_provider == "model" and value_llm else None
        if config.value_provider == "model" and value_llm is None:
            raise ExecutorError("--value-provider model needs an endpoint (the optimizer's is used by default)")

    # ---- state -------------------------------------------------------------------

    def _restore(self, resume: bool) -> int:
        policy = {"optimizer_policy": self.config.optimizer_policy} if self.config.optimizer_policy else {}
        self.workspace.start({**self.config.fingerprint(), "rounds": self.config.rounds, **policy}, resume)
        removed = self.workspace.discard_unfinished()
        if removed:
            self.log(f"resume: discarded unfinished {', '.join(removed)}")
        results = self.workspace.read_results()
        done = self.workspace.done_rounds()
        for number in done:
            node, scores = self.workspace.load_round(number)
            if node:
                node.visits = int(results.get("visits", {}).get(str(number), 0))
                self.tree.add(node)
            elif scores.get("status") == "rejected":
                self.rejected[number] = {"round": number, "parent": scores.get("parent"),
                                         "reasons": list(scores.get("reasons", []))}
            if "round_usage" in scores:
                self.round_info[number] = scores["round_usage"]
        self.history = list(results.get("top3_history", []))[: len(done)]
        totals = results.get("totals", {})
        self.usage = Usage(**{k: totals.get(k, 0) for k in asdict(Usage())})
        state = self.workspace.read_rng_state() or results.get("rng_state")  # results.json: older workspaces
        if state:
            self.rng.set_state((state[0], np.array(state[1], dtype=np.uint32), *state[2:]))
        if done:
            if done[-1] >= self.config.rounds:
                self.log(f"resume: the search is already finished ({done[-1]} of {self.config.rounds} rounds done); "
                         f"nothing to run (pass a larger --rounds to continue it)")
            elif self._converged():
                self.log(f"resume: the search converged at round {done[-1]}; nothing to run "
                         f"(the top-3 mean has not changed for {self.config.convergence_rounds} rounds)")
            else:
                self.log(f"resume: {len(done)} round(s) done, continuing at round {done[-1] + 1} "
                         f"of {self.config.rounds}")
        return done[-1] if done else 0

    def _save(self, rounds_done: int, converged: bool) -> None:
        state = self.rng.get_state()
        self.workspace.write_rng_state([state[0], state[1].tolist(), *state[2:]])
        best = self.tree.best() if self.tree.nodes else None
        self.workspace.write_results({
            "benchmark": self.config.benchmark,
            "scoring": self.config.scoring,
            "rounds_done": rounds_done,
            "converged": converged,
            "best_round": best.round if best else None,
            "best_validation_score": best.mean if best else None,
            "rounds": [n.summary() for n in sorted(self.tree.nodes.values(), key=lambda n: n.round)],
            "rejected_rounds": [self.rejected[k] for k in sorted(self.rejected)],
            "round_usage": {str(k): v for k, v in sorted(self.round_info.items())},
            "visits": {str(n.round): n.visits for n in self.tree.nodes.values()},
            "top3_history": self.history,
            "totals": asdict(self.usage),
            "validation_temperature": self.config.validation_temperature,
        })
        self.workspace.write_experience(self.pool.export_jsonl())

    # ---- evaluation --------------------------------------------------------------

    async def _evaluate(self, number: int, graph: str, prompt: str) -> tuple[list[float], list[dict], Usage]:
        directory = self.workspace.write_workflow(number, graph, prompt)
        scores, records, spent = [], [], Usage()
        total = self.config.validation_rounds
        for run in range(total):
            config = EvalConfig(benchmark=self.config.benchmark, split="validate", workflow=str(directory),
                                limit=self.config.limit, concurrency=self.config.concurrency,
                                data_dir=self.config.data_dir, scoring=self.config.scoring,
                                sample_temperature=self.config.sample_temperature)
            executor = self.executor
            if run > 0:
                executor = SampledExecutor(self.executor, self.config.validation_temperature,
                                           validation_seed(self.config.seed, number, run))
            started = time.monotonic()
            summary, run_records = await evaluate(config, executor, progress=self.progress)
            if run_records and all(r.error for r in run_records):
                await self.executor.check()  # a dead executor is a set-up error, not a score of 0
            scores.append(summary.score)
            records += [{**asdict(r), "run": run, "temperature": self.config.validation_temperature if run else None,
                         "seed": validation_seed(self.config.seed, number, run) if run else None} for r in run_records]
            cached = f" ({summary.cached_calls} answered from the cache)" if summary.cached_calls else ""
            self.log(f"round {number}: validation run {run + 1}/{total}: score {summary.score:.4f} on {summary.n} "
                     f"problems, {summary.calls} calls{cached}, {time.monotonic() - started:.1f}s")
            spent.add(Usage(calls=summary.calls, cached=summary.cached_calls, prompt_tokens=summary.prompt_tokens,
                            completion_tokens=summary.completion_tokens, cost_usd=summary.cost_usd))
        return scores, records, spent

    # ---- one round ---------------------------------------------------------------

    async def _initial_round(self) -> None:
        seed = initial_workflow(self.config.benchmark, self.config.initial_workflow, self.config.action_space)
        self.log(f"round 1/{self.config.rounds}: evaluating the initial workflow {self.config.initial_workflow} "
                 f"({self._plan()})")
        scores, records, spent = await self._evaluate(1, seed.graph, seed.prompt)
        node = Node(round=1, graph=seed.graph, prompt=seed.prompt, modification="initial workflow",
                    scores=scores, cost_usd=spent.cost_usd, calls=spent.calls)
        self.usage.add(spent)
        self.tree.add(node)
        self.workspace.commit_round(node, 1, records, {"status": "evaluated", "round_usage": self._round_usage(1)})

    async def _expansion_round(self, number: int) -> None:
        if self.model_value:
            await self.model_value.prefetch(list(self.tree.nodes.values()))
        value = self.model_value or (empirical(self.pool) if self.config.value_provider == "empirical" else None)
        parent, why = select(self.tree, self.config.selection, self.rng, value)
        parent.visits += 1
        self.log(f"round {number}/{self.config.rounds}: asking the optimizer to modify round {parent.round} "
                 f"(score {parent.mean:.4f}; {why['rule']} selection)")
        prompt_text, judge = self._proposal(parent)
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
            action = judge(answer.text)
            self.workspace.log_expansion({"round": number, "parent": parent.round, "attempt": attempt,
                                          "valid": action.is_valid, "reason": action.reason,
                                          "rejection": None if action.is_valid else rejection_kind(action.reason),
                                          "modification": action.modification, "selection": why,
                                          "optimizer": self.optimizer.config.model, "answer": answer.text[:20000]})
            if action.is_valid:
                break
            reasons.append(action.reason)
            self.log(f"round {number}: expansion {attempt}/{self.config.max_retries} rejected: {action.reason}")
        else:
            self.rejected[number] = {"round": number, "parent": parent.round, "reasons": reasons}
            self.workspace.commit_round(None, number, [], {"status": "rejected", "parent": parent.round,
                                                           "reasons": reasons, "round_usage": self._round_usage(number)})
            return
        self.log(f"round {number}: optimizer answer {attempt} accepted: {action.modification[:100]}; "
                 f"evaluating it ({self._plan()})")
        scores, records, spent = await self._evaluate(number, action.workflow.graph, action.workflow.prompt)
        node = Node(round=number, graph=action.workflow.graph, prompt=action.workflow.prompt, parent=parent.round,
                    modification=action.modification, scores=scores, cost_usd=spent.cost_usd, calls=spent.calls)
        self.usage.add(spent)
        self.tree.add(node)
        self.pool.add(Experience(parent.round, number, action.modification, parent.mean, node.mean))
        self.workspace.commit_round(node, number, records, {"status": "evaluated",
                                                            "round_usage": self._round_usage(number)})

    def _proposal(self, parent: Node):
        """(the optimizer's prompt for expanding `parent`, the function that judges an answer): the one
        place the two action spaces differ; the retry loop, evaluation and records are shared."""
        experience = self.pool.of_parent(parent.round)
        failures = self.workspace.failures(parent.round)
        if self.config.action_space == "canvas":
            return self._canvas_proposal(parent, experience, failures)
        tried = {normalize_modification(e.modification) for e in experience}
        text = optimizer_prompt(self.config.benchmark, parent.graph, parent.prompt, parent.mean, experience,
                                failures, get_benchmark(self.config.benchmark).is_code)
        return text, lambda answer: project(answer, parent.graph, parent.prompt, tried)

    def _canvas_proposal(self, parent: Node, experience: list[Experience], failures: list[dict]):
        parent_canvas = canvas_of(parent.graph, parent.prompt)
        if parent_canvas is None:  # a round file edited by hand: the search cannot go on from it
            raise WorkspaceMismatch(f"round {parent.round} of {self.workspace.root} is not a compiled canvas "
                                    "(its graph.py/prompt.py were changed?): it cannot be expanded by canvas edits")
        tried = tried_canvases(parent_canvas, [e.modification for e in experience])
        text = canvas_optimizer_prompt(self.config.benchmark, parent_canvas, parent.mean, experience, failures)
        return text, lambda answer: search_move(project_canvas(answer, parent_canvas, tried))

    def _plan(self) -> str:
        runs = self.config.validation_rounds
        problems = f"{self.config.limit} validation problems" if self.config.limit else "the whole validation split"
        return f"{runs} validation run{'s' if runs != 1 else ''} on {problems}"

    def _round_usage(self, number: int) -> dict:
        """What this round spent (optimizer and executor): the totals since the round began."""
        before = self._round_start_usage
        info = {"wall_s": round(time.monotonic() - self._round_started, 3),
                "calls": self.usage.calls - before.calls, "cached": self.usage.cached - before.cached,
                "cost_usd": round(self.usage.cost_usd - before.cost_usd, 6)}
        self.round_info[number] = info
        return info

    def _describe(self, number: int, best_before) -> str:
        """One line on what round `number` did."""
        node = self.tree.nodes.get(number)
        if node is None:
            reasons = self.rejected.get(number, {}).get("reasons", [])
            parent = self.rejected.get(number, {}).get("parent")
            return (f"rejected: no valid modification of round {parent} in {len(reasons)} optimizer answer(s)"
                    + (f" (last: {reasons[-1][:160]})" if reasons else ""))
        spread = f"{node.mean:.4f} ± {node.std:.4f}" if len(node.scores) > 1 else f"{node.mean:.4f}"
        if node.parent is None:
            return f"initial workflow scored {spread}"
        parent = self.tree.nodes[node.parent]
        delta = node.mean - parent.mean
        verdict = ("new best" if best_before is None or node.mean > best_before.mean
                   else f"not better than the best ({best_before.mean:.4f}, round {best_before.round})")
        return (f"accepted (modified round {node.parent}): scored {spread}, {delta:+.4f} vs its parent; {verdict}")

    def round_metrics(self, number: int) -> dict[str, float]:
        """What a logger plots per round: the round's score (absent when it was rejected), the
        tree's best so far, the top-3 mean AFlow's convergence test watches, and the spend."""
        node = self.tree.nodes.get(number)
        info = self.round_info.get(number, {})
        metrics = {"search/accepted": node is not None, "search/best_score": self.tree.best().mean,
                   "search/top3_mean": self.history[-1] if self.history else None,
                   "search/cost_usd": self.usage.cost_usd, "search/calls": self.usage.calls,
                   "search/round_seconds": info.get("wall_s")}
        if node is not None:
            metrics.update({"search/round_score": node.mean, "search/round_std": node.std})
        return metrics

    def _converged(self) -> bool:
        n = self.config.convergence_rounds
        if n <= 0 or len(self.history) <= n:
            return False
        recent = self.history[-(n + 1):]
        return all(abs(b - a) <= self.config.convergence_tolerance for a, b in zip(recent, recent[1:], strict=False))

    # ---- the loop ----------------------------------------------------------------

    async def run(self, resume: bool = False) -> SearchResult:
        started = time.monotonic()
        # one real chat completion each: a URL that is not an OpenAI-compatible /v1 is a set-up error
        await self.executor.check("executor", chat=True)
        await self.optimizer.check("optimizer", chat=True)
        last = self._restore(resume)
        converged = self._converged()
        first = last + 1
        for number in range(first, self.config.rounds + 1):
            if converged:
                break
            best_before = self.tree.best() if self.tree.nodes else None
            self._round_started, self._round_start_usage = time.monotonic(), Usage(**asdict(self.usage))
            if number == 1:
                await self._initial_round()
            else:
                await self._expansion_round(number)
            self.history.append(self.tree.top_mean(3))
            converged = self._converged()
            self._save(number, converged)
            best = self.tree.best()
            elapsed = time.monotonic() - started
            left = self.config.rounds - number
            eta = (f"about {_duration(elapsed / (number - first + 1) * left)} left for {left} more round(s)"
                   if left and not converged else "done")
            cached = f" (+{self.usage.cached} answered from the cache)" if self.usage.cached else ""
            self.log(f"round {number}/{self.config.rounds}: {self._describe(number, best_before)}. "
                     f"Best {best.mean:.4f} at round {best.round}; ${self.usage.cost_usd:.4f}, "
                     f"{self.usage.calls} calls{cached} so far; {_duration(elapsed)} elapsed, {eta}"
                     + ("; converged: the top-3 mean has not changed for "
                        f"{self.config.convergence_rounds} rounds" if converged else ""))
            if self.on_round:
                self.on_round(number, self.round_metrics(number))
        best = self.tree.best()
        return SearchResult(rounds_done=max(self.workspace.done_rounds(), default=0), best_round=best.round,
                            best_validation_score=best.mean, total_cost_usd=round(self.usage.cost_usd, 6),
                            calls=self.usage.calls, cached_calls=self.usage.cached,
                            wall_s=round(time.monotonic() - started, 3), converged=converged)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
