"""The health guard: a run that trains on nothing stops, with a checkpoint and one line, instead of
burning GPU hours.

verl masks a failed episode (no reward can be trusted: a dead worker, an executor that went away, data
the workers cannot load) and trains on the rest; if every episode fails, it trains on nothing, step after
step, and the logs only show a flat reward. Likewise a step where no GRPO group has a reward spread has
no reward gradient at all. `HealthGuard.check` reads each training step's counts (from the run report:
episodes, failed episodes, groups, groups with a spread) and returns the reason to stop after
`env.health.failed_steps` failing steps or `env.health.flat_steps` flat steps in a row (0: that check off).
The thresholds are agent_system.config.HealthConfig; recipes/train.py saves the checkpoint, writes
`stopped.json` and stops.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

STOPPED = "stopped.json"


class RunStopped(RuntimeError):
    """Raised inside fit (the task runner) to stop the run; the reason is also in `stopped.json`."""


@dataclass
class HealthGuard:
    max_failed_share: float = 0.5
    failed_steps: int = 3
    flat_steps: int = 10
    failing: int = 0  # consecutive steps over max_failed_share
    flat: int = 0  # consecutive steps with no reward spread in any group
    history: list[dict] = field(default_factory=list)

    @classmethod
    def of(cls, health) -> HealthGuard:
        return cls(float(health.max_failed_share), int(health.failed_steps), int(health.flat_steps))

    def check(self, step: int, counts: dict) -> str | None:
        episodes = max(1, int(counts.get("episodes", 0)))
        share = int(counts.get("failed", 0)) / episodes
        self.failing = self.failing + 1 if share > self.max_failed_share else 0
        self.flat = self.flat + 1 if int(counts.get("groups", 0)) and not int(counts.get("spread", 0)) else 0
        self.history.append({"step": step, "failed_share": share, "spread": int(counts.get("spread", 0))})
        if self.failed_steps > 0 and self.failing >= self.failed_steps:
            reasons = counts.get("reasons") or []
            example = f"; e.g. {reasons[0]}" if reasons else ""
            return (f"{share:.0%} of the episodes of step {step} failed, over env.health.max_failed_share="
                    f"{self.max_failed_share:g} for {self.failing} steps in a row{example}")
        if self.flat_steps > 0 and self.flat >= self.flat_steps:
            return (f"no GRPO group had a reward spread for {self.flat} steps in a row (to step {step}): the reward "
                    "gives no gradient (env.health.flat_steps)")
        return None


def write_stopped(out_dir: Path, step: int, reason: str, checkpoint: str | None) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / STOPPED
    path.write_text(json.dumps({"step": step, "reason": reason, "checkpoint": checkpoint}, indent=1))
    return path


def read_stopped(out_dir: Path) -> dict | None:
    try:
        return json.loads((out_dir / STOPPED).read_text())
    except (OSError, ValueError):
        return None
