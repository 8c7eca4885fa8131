"""The environment is part of a training run's state: its directory is the run's own and is saved with
every verl checkpoint, and restored from it on resume.

A run's AFlow workers keep their search trees, experience pools and response cache in one directory,
`env.workdir` (agent_system/environments/env_package/aflow/worker.py). A shared default would let a second
run (or a resumed one) read another run's experience, keyed by round numbers that mean other workflows
there. So training puts it at `<trainer.default_local_dir>/env`, and:

- after verl saves `global_step_N/`, the directory is copied to `global_step_N/env/` (SQLite files
  through SQLite's backup API, so a copy is consistent even while a connection is open; at that point of
  verl's loop no episode is running, so the copy is the state after step N);
- when verl resumes from `global_step_N/`, `global_step_N/env/` replaces the directory before any worker
  exists (the workers are created by the first episode), so the search continues from the tree it had at
  step N, losing at most the steps since that checkpoint; a run that starts from scratch starts from an
  empty directory.

On several nodes the directory must be on storage every node sees, as verl's checkpoint directory must.
"""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

SNAPSHOT = "env"


def run_env_dir(default_local_dir: str | Path) -> Path:
    return Path(default_local_dir).resolve() / SNAPSHOT


def _copy_sqlite(source: Path, target: Path) -> None:
    with sqlite3.connect(source) as src, sqlite3.connect(target) as dst:
        src.backup(dst)


def snapshot(env_dir: Path, step_dir: Path) -> Path:
    """Copy the environment directory to `step_dir/env` (replacing an older copy); returns that path."""
    target = step_dir / SNAPSHOT
    staging = step_dir / f".{SNAPSHOT}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    if env_dir.is_dir():
        for path in sorted(env_dir.rglob("*")):
            relative = path.relative_to(env_dir)
            if path.is_dir() or path.name.endswith(("-wal", "-shm", "-journal", ".tmp")):
                continue
            (staging / relative).parent.mkdir(parents=True, exist_ok=True)
            if path.suffix == ".sqlite":
                _copy_sqlite(path, staging / relative)
            else:
                shutil.copy2(path, staging / relative)
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    return target


def restore(step_dir: Path | None, env_dir: Path) -> str:
    """Make `env_dir` the state saved at `step_dir` (None: a run from scratch, an empty directory).
    Returns one line saying what was restored."""
    shutil.rmtree(env_dir, ignore_errors=True)
    source = step_dir / SNAPSHOT if step_dir is not None else None
    if source is None or not source.is_dir():
        env_dir.mkdir(parents=True, exist_ok=True)
        if step_dir is None:
            return f"environment: a fresh state in {env_dir}"
        return f"environment: {step_dir.name} has no saved environment state; a fresh state in {env_dir}"
    shutil.copytree(source, env_dir)
    searches = sorted(p.stem for p in (env_dir / "search").glob("*.pkl"))
    return (f"environment: restored from {source} (searches: {', '.join(searches) or 'none'}) into {env_dir}")


def prune(checkpoint_dir: Path) -> None:
    """Drop environment copies of checkpoints whose actor verl has already removed (max_actor_ckpt_to_keep)."""
    for step_dir in checkpoint_dir.glob("global_step_*"):
        if (step_dir / SNAPSHOT).is_dir() and not (step_dir / "actor").exists():
            shutil.rmtree(step_dir, ignore_errors=True)
