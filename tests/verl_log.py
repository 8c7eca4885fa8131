"""Reading what verl itself measured, from its file logger (`trainer.logger=[...,file]`, written to
`$VERL_FILE_LOGGER_PATH`: one JSON object `{"step": N, "data": {...}}` per line, by the process that runs
`RayPPOTrainer.fit`).

The console logger is not a record: Ray forwards the task runner's prints through its log monitor, and in
CI one step's console line came back without keys verl had logged (`timing_s/step`), so a test read a step
that looked complete and was not. The file logger writes each step's whole dict in one write.
"""

from __future__ import annotations

import json
import math
from pathlib import Path


def logger_env(path: Path) -> dict[str, str]:
    """The environment that sends verl's file logger to `path` (add `file` to trainer.logger as well)."""
    return {"VERL_FILE_LOGGER_PATH": str(path)}


def step_metrics(path: Path) -> dict[int, dict[str, float]]:
    """Every step verl logged to `path`, as {N: {key: value}} (a later record for N wins, as on resume)."""
    steps: dict[int, dict[str, float]] = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            steps[int(row["step"])] = row["data"]
    return steps


def assert_learning_step(metrics: dict[str, float]) -> None:
    """A real update happened: the policy loss is a finite number and the gradient is not zero
    (a run whose episodes all failed has a NaN loss or no gradient, and used to exit 0)."""
    loss, grad = metrics.get("actor/pg_loss"), metrics.get("actor/grad_norm")
    assert loss is not None and math.isfinite(loss), metrics
    assert grad is not None and math.isfinite(grad) and grad > 0, metrics
