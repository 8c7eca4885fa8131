"""The experience pool: what each modification did to its parent's score.

sqlite (WAL) so several processes — parallel searches, RL environment workers — can share
one pool safely; every access opens a short connection of its own."""

from __future__ import annotations

import json
import sqlite3
import statistics
from contextlib import closing
from dataclasses import asdict, dataclass
from pathlib import Path

from aflow.files import open_sqlite

SCHEMA = """CREATE TABLE IF NOT EXISTS experience (
    scope TEXT, parent INTEGER, child INTEGER, modification TEXT,
    score_before REAL, score_after REAL, PRIMARY KEY (scope, child))"""


@dataclass(frozen=True)
class Experience:
    parent: int
    child: int
    modification: str
    score_before: float
    score_after: float

    @property
    def success(self) -> bool:
        return self.score_after > self.score_before


class ExperiencePool:
    def __init__(self, path: str | Path, scope: str = "default"):
        self.path = str(path)
        self.scope = scope  # one file may hold several searches (e.g. one per benchmark)
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._connect().close()

    def _connect(self) -> sqlite3.Connection:
        return open_sqlite(self.path, SCHEMA)

    def add(self, record: Experience) -> None:
        with closing(self._connect()) as db, db:
            db.execute("INSERT OR REPLACE INTO experience VALUES (?, ?, ?, ?, ?, ?)",
                       (self.scope, record.parent, record.child, record.modification,
                        record.score_before, record.score_after))

    def all(self) -> list[Experience]:
        with closing(self._connect()) as db, db:
            rows = db.execute("SELECT parent, child, modification, score_before, score_after FROM experience "
                              "WHERE scope = ? ORDER BY child", (self.scope,)).fetchall()
        return [Experience(*row) for row in rows]

    def of_parent(self, parent: int) -> list[Experience]:
        return [e for e in self.all() if e.parent == parent]

    def mean_improvement(self, parent: int) -> float | None:
        deltas = [e.score_after - e.score_before for e in self.of_parent(parent)]
        return statistics.fmean(deltas) if deltas else None

    def export_jsonl(self) -> str:
        return "".join(json.dumps({**asdict(e), "success": e.success}) + "\n" for e in self.all())
