"""Reading verl's console logger: `step:N - key:value - ...` lines (verl.utils.logger.aggregate_logger's
concat_dict_to_str), so the CPU and GPU end-to-end tests can assert on what verl itself measured."""

from __future__ import annotations

import math
import re

_NUMPY_SCALAR = re.compile(r"^np\.\w+\((.*)\)$")  # numpy 2's repr of a scalar: np.float64(0.31)


def step_metrics(log: str) -> dict[int, dict[str, float]]:
    """Every `step:N - k:v - ...` line of a log, as {N: {k: v}} (a later line for N wins)."""
    steps: dict[int, dict[str, float]] = {}
    for line in log.splitlines():
        start = line.find("step:")
        if start < 0:
            continue
        parts = line[start:].split(" - ")
        try:
            step = int(parts[0].split(":", 1)[1])
        except ValueError:
            continue
        values = {}
        for part in parts[1:]:
            key, _, value = part.rpartition(":")
            wrapped = _NUMPY_SCALAR.match(value.strip())
            try:
                values[key.strip()] = float(wrapped.group(1) if wrapped else value)
            except ValueError:
                continue
        if values:
            steps[step] = values
    return steps


def assert_learning_step(metrics: dict[str, float]) -> None:
    """A real update happened: the policy loss is a finite number and the gradient is not zero
    (a run whose episodes all failed has a NaN loss or no gradient, and used to exit 0)."""
    loss, grad = metrics.get("actor/pg_loss"), metrics.get("actor/grad_norm")
    assert loss is not None and math.isfinite(loss), metrics
    assert grad is not None and math.isfinite(grad) and grad > 0, metrics
