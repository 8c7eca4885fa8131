"""Metrics of `aflow evaluate` and `aflow optimize` for the loggers a trainer user already watches.

The names are verl's `trainer.logger` names (console, tensorboard, wandb), so one habit covers
training and search. Without verl or torch: TensorBoard event files are written with the
`tensorboard` package's own writer and protos (as torch's SummaryWriter does), into
$TENSORBOARD_DIR (verl's variable) or `<run dir>/tensorboard`; wandb is imported only when asked
for. Every run with a directory also gets `metrics.jsonl` (one JSON object per step), which needs
no package at all. A logger that cannot start is a set-up error before anything is run.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

LOGGERS = ("console", "tensorboard", "wandb")


class TrackingError(RuntimeError):
    """A requested logger cannot start (a missing package, no directory for its files)."""


def parse_loggers(text: str) -> tuple[str, ...]:
    """`--logger tensorboard,wandb` (console is what the command prints anyway)."""
    names = tuple(dict.fromkeys(n.strip().lower() for n in text.split(",") if n.strip()))
    unknown = [n for n in names if n not in LOGGERS]
    if unknown:
        raise ValueError(f"unknown logger {unknown[0]!r} (choose from: {', '.join(LOGGERS)})")
    return names


class _TensorBoard:
    def __init__(self, directory: Path):
        try:
            from tensorboard.compat.proto.event_pb2 import Event
            from tensorboard.compat.proto.summary_pb2 import Summary
            from tensorboard.summary.writer.event_file_writer import EventFileWriter
        except ImportError as exc:
            raise TrackingError("--logger tensorboard needs the tensorboard package (pip install tensorboard)") from exc
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self._event, self._summary = Event, Summary
        self._writer = EventFileWriter(str(directory))

    def log(self, metrics: dict[str, float], step: int) -> None:
        values = [self._summary.Value(tag=k, simple_value=v) for k, v in metrics.items()]
        self._writer.add_event(self._event(wall_time=time.time(), step=step, summary=self._summary(value=values)))
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class _Wandb:
    def __init__(self, project: str, name: str, config: dict, directory: Path | None):
        try:
            import wandb
        except ImportError as exc:
            raise TrackingError("--logger wandb needs the wandb package (pip install wandb; then wandb login, "
                                "or WANDB_MODE=offline)") from exc
        self._run = wandb.init(project=project, name=name, config=config,
                               dir=str(directory) if directory else None, reinit=True)

    def log(self, metrics: dict[str, float], step: int) -> None:
        self._run.log(metrics, step=step)

    def close(self) -> None:
        self._run.finish()


class Tracker:
    """Fans `log(metrics, step)` out to the requested loggers (and `run_dir/metrics.jsonl` with
    `jsonl`). Values that are
    not finite numbers are left out (a round with no score is absent, not 0)."""

    def __init__(self, loggers: tuple[str, ...], run_dir: Path | None, project: str, name: str,
                 config: dict[str, Any] | None = None, jsonl: bool = False):
        self._sinks: list[Any] = []
        self._jsonl = None
        self._jsonl_path = run_dir / "metrics.jsonl" if jsonl and run_dir is not None else None
        try:
            if "tensorboard" in loggers:
                root = os.environ.get("TENSORBOARD_DIR")
                if not root and run_dir is None:
                    raise TrackingError("--logger tensorboard needs --out DIR (or $TENSORBOARD_DIR) for its files")
                self._sinks.append(_TensorBoard(Path(root) / name if root else run_dir / "tensorboard"))
            if "wandb" in loggers:
                self._sinks.append(_Wandb(project, name, config or {}, run_dir))
        except BaseException:
            self.close()
            raise

    def log(self, metrics: dict[str, Any], step: int) -> None:
        clean = {k: float(v) for k, v in metrics.items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
        clean.update({k: float(v) for k, v in metrics.items() if isinstance(v, bool)})
        if not clean:
            return
        if self._jsonl_path is not None:
            if self._jsonl is None:  # opened at the first step: a run refused at start leaves no file
                self._jsonl = open(self._jsonl_path, "a", encoding="utf-8")
            self._jsonl.write(json.dumps({"step": step, **clean}) + "\n")
            self._jsonl.flush()
        for sink in self._sinks:
            sink.log(clean, step)

    def close(self) -> None:
        for sink in self._sinks:
            sink.close()
        self._sinks = []
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
