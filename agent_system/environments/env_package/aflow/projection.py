"""LLM text -> actions with an `is_valid` flag: the same projection `aflow optimize` uses."""

from __future__ import annotations

from aflow.search.projection import Action, project


def project_actions(texts: list[str], parents: list[tuple[str, str]],
                    tried: list[set[str]] | None = None) -> tuple[list[Action], list[bool]]:
    """Vectorized `aflow.search.projection.project`: (actions, is_valid flags)."""
    tried = tried or [set() for _ in texts]
    actions = [project(text, graph, prompt, seen) for text, (graph, prompt), seen in zip(texts, parents, tried,
                                                                                      strict=True)]
    return actions, [a.is_valid for a in actions]


__all__ = ["Action", "project", "project_actions"]
