"""Writes that never leave a half-written file behind."""

from __future__ import annotations

import json
import os
import sqlite3
import tempfile
import time
from pathlib import Path
from typing import Any


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# Files get the mode an ordinary open() would give them (0644 under the usual umask), not
# mkstemp's private 0600: results are meant to be read by others sharing the machine.
FILE_MODE = 0o666 & ~_umask()


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write to a temporary file in the same directory, fsync, then rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, FILE_MODE)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | os.PathLike, value: Any) -> None:
    atomic_write_text(path, json.dumps(value, indent=2, ensure_ascii=False, default=str) + "\n")


class JsonlAppender:
    """One JSON object per line, flushed as each arrives, so a crash keeps what was done."""

    def __init__(self, path: str | os.PathLike, append: bool = False):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._file = open(path, "a" if append else "w", encoding="utf-8")

    def write(self, record: dict) -> None:
        self._file.write(json.dumps(record, ensure_ascii=False, default=str) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def open_sqlite(path: str | os.PathLike, schema: str | None = None, attempts: int = 50) -> sqlite3.Connection:
    """A connection to a database shared by several processes (WAL, a busy timeout).

    Switching a new file to WAL or creating its table can fail with "database is locked"
    when several processes open it at the same moment, before the busy timeout applies;
    those first steps are retried with a short backoff."""
    for attempt in range(attempts):
        db = sqlite3.connect(str(path), timeout=60)
        try:
            db.execute("PRAGMA busy_timeout = 60000")
            db.execute("PRAGMA journal_mode=WAL")
            if schema:
                with db:
                    db.execute(schema)
            return db
        except sqlite3.OperationalError as exc:
            db.close()
            if "locked" not in str(exc) or attempt == attempts - 1:
                raise
            time.sleep(0.01 * (attempt + 1))
    raise AssertionError("unreachable")
