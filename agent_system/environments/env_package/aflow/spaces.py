"""What env.action_space decides: the Episode class and the workflow an episode or a search starts from.

One place, because three callers must agree: the worker (task roots and query episodes) and
data_prep, whose query-mode parquet prompt must be the environment's first observation exactly
(`query_episode(...).observation()` is that observation, built by the environment's own code).
"""

from __future__ import annotations

from aflow import canvas as cv
from aflow.benchmarks import Benchmark, Problem
from aflow.workflows import WorkflowCode, from_source, load_workflow
from agent_system.environments.env_package.aflow.canvas_episode import CanvasEpisode
from agent_system.environments.env_package.aflow.episode import Episode
from agent_system.environments.env_package.aflow.measure import Meter, Scored


def episode_class(action_space: str) -> type[Episode]:
    return CanvasEpisode if action_space == "canvas" else Episode


def start_workflow(action_space: str, code: bool, initial_workflow: str) -> WorkflowCode:
    """The code space starts at env.initial_workflow; the canvas space at the compiled initial canvas."""
    if action_space == "canvas":
        graph, prompt = cv.compile_canvas(cv.initial(code), code)
        return from_source(graph, prompt, name="canvas")
    return load_workflow(initial_workflow)


def query_episode(action_space: str, bench: Benchmark, problem: Problem, initial_workflow: str,
                  meter: Meter | None = None, *, max_turns: int = 1, max_action_chars: int = 20_000, judge=None,
                  decoys: list[list[str]] = ()) -> Episode:
    """A query-mode episode on one problem (without a meter: good for its observation only)."""
    seed = start_workflow(action_space, bench.is_code, initial_workflow)
    meter = meter or Meter(bench, None, None, {})
    return episode_class(action_space)("query", meter, max_turns, Scored(seed.graph, seed.prompt, 0.0), seed, None,
                                       [], [problem], max_action_chars, judge, decoys=decoys)
