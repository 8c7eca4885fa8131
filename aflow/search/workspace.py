"""The run directory of one search. Every file is written atomically; a round counts as done
only once its `scores.json` exists (written last), so a crash or `kill -9` at any point
leaves completed rounds intact and `--resume` redoes at most the round in progress.

    WORKSPACE/
      config.json                 the run's settings (a resume must match them)
      round_1/graph.py prompt.py  the workflow
      round_1/log.jsonl           one record per problem and validation run
      round_1/scores.json         scores, mean, std, parent, modification, cost: the commit mark
      expansions.jsonl            every optimizer answer, accepted or rejected, with the reason
      experience.sqlite           the experience pool (experience.jsonl: its export)
      results.json                per-round summary (evaluated and rejected rounds), best round, totals
      rng_state.json              the selection RNG's state (for --resume)
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from aflow.files import atomic_write_json, atomic_write_text
from aflow.search.tree import Node


class WorkspaceMismatch(RuntimeError):
    """--resume on a workspace made with different settings."""


class Workspace:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    def round_dir(self, number: int) -> Path:
        return self.root / f"round_{number}"

    def done_rounds(self) -> list[int]:
        numbers = []
        for path in self.root.glob("round_*"):
            suffix = path.name.split("_", 1)[1]
            if suffix.isdigit() and (path / "scores.json").is_file():
                numbers.append(int(suffix))
        return sorted(numbers)

    def discard_unfinished(self) -> list[int]:
        """Remove round directories a crash left without scores.json."""
        removed = []
        for path in self.root.glob("round_*"):
            if path.is_dir() and not (path / "scores.json").is_file():
                shutil.rmtree(path)
                removed.append(path.name)
        return removed

    # ---- config ------------------------------------------------------------------

    def start(self, config: dict, resume: bool) -> None:
        path = self.root / "config.json"
        if path.is_file():
            if not resume:
                raise WorkspaceMismatch(f"{self.root} already holds a search: pass --resume, or use a new --workspace")
            saved = json.loads(path.read_text())
            keys = ("benchmark", "validation_rounds", "limit", "seed", "selection", "value_provider", "value_weight",
                    "scoring", "validation_temperature", "action_space")
            saved.setdefault("scoring", "aflow")  # written before the variant existed: AFlow's rules
            saved.setdefault("action_space", "code")  # written before canvas searches existed
            # written before repeats were sampled: its repeats were run 1's answers; not a reason to refuse
            saved.setdefault("validation_temperature", config.get("validation_temperature"))
            different = [k for k in keys if saved.get(k) != config.get(k)]
            if different:
                raise WorkspaceMismatch("--resume with different settings than the workspace: " + ", ".join(
                    f"{k} (workspace: {saved.get(k)}, now: {config.get(k)})" for k in different))
            return
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, config)

    # ---- rounds ------------------------------------------------------------------

    def write_workflow(self, number: int, graph: str, prompt: str) -> Path:
        directory = self.round_dir(number)
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write_text(directory / "graph.py", graph)
        atomic_write_text(directory / "prompt.py", prompt)
        return directory

    def commit_round(self, node: Node | None, number: int, records: list[dict], status: dict) -> None:
        directory = self.round_dir(number)
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write_text(directory / "log.jsonl", "".join(json.dumps(r, default=str) + "\n" for r in records))
        atomic_write_json(directory / "scores.json", {**(node.summary() if node else {}), **status})

    def load_round(self, number: int) -> tuple[Node | None, dict]:
        directory = self.round_dir(number)
        scores = json.loads((directory / "scores.json").read_text())
        if scores.get("status") != "evaluated":
            return None, scores
        node = Node(round=number, graph=(directory / "graph.py").read_text(), prompt=(directory / "prompt.py").read_text(),
                    parent=scores.get("parent"), modification=scores.get("modification", ""),
                    scores=list(scores.get("scores", [])), cost_usd=scores.get("cost_usd", 0.0),
                    calls=scores.get("calls", 0), visits=scores.get("visits", 0))
        return node, scores

    def failures(self, number: int, limit: int = 5) -> list[dict]:
        """Problems a round's workflow lost points on (from its first validation run)."""
        path = self.round_dir(number) / "log.jsonl"
        if not path.is_file():
            return []
        out = []
        for line in path.read_text().splitlines():
            record = json.loads(line)
            if record.get("run", 0) == 0 and record.get("score", 0) < 1:
                out.append(record)
            if len(out) >= limit:
                break
        return out

    # ---- run-level files ---------------------------------------------------------

    def log_expansion(self, entry: dict) -> None:
        with open(self.root / "expansions.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(entry, default=str) + "\n")

    def write_results(self, results: dict) -> None:
        atomic_write_json(self.root / "results.json", results)

    def write_rng_state(self, state: list) -> None:
        atomic_write_json(self.root / "rng_state.json", state)

    def read_rng_state(self) -> list | None:
        path = self.root / "rng_state.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def read_results(self) -> dict:
        path = self.root / "results.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    def write_experience(self, jsonl: str) -> None:
        atomic_write_text(self.root / "experience.jsonl", jsonl)
