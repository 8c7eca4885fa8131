"""What a training run prints and leaves behind, as the main job promises a newcomer: one line per step
(reward, loss, seconds, GRPO groups with a reward spread, failed episodes, the share of the policy's
actions the environment accepted), then the checkpoint and a PNG
of reward per step, with `summary.json`, in `trainer.default_local_dir`.

It runs inside verl's task-runner process (the one that runs `RayPPOTrainer.fit`) and watches two points
verl already has: the advantage step, through agent_system.advantage's hook (`on_batch`: every episode's
uid and score are there, and the agent loop's `episode_failed`), and `verl.utils.tracking.Tracking.log`
(`on_log`: the step's metrics, after verl computed them). Nothing is recomputed.
"""

from __future__ import annotations

import functools
import json
from collections import defaultdict
from pathlib import Path
from typing import Any


class RunReport:
    def __init__(self, out_dir: str | Path, on_step=None):
        self.out_dir = Path(out_dir)
        self.history: list[dict[str, float]] = []
        self._batch: dict[str, int] = {}
        self._reasons: list[str] = []
        self.on_step = on_step  # (step, counts) after each training step's line: the health guard

    def on_batch(self, data) -> None:
        """Groups (uids) whose episodes got different rewards: only those carry a GRPO signal."""
        scores = data.batch["token_level_rewards"].sum(-1).tolist()
        groups: dict[Any, list[float]] = defaultdict(list)
        for uid, score in zip(data.non_tensor_batch["uid"], scores, strict=True):
            groups[uid].append(score)
        failed = data.non_tensor_batch.get("episode_failed")
        self._batch = {"episodes": len(scores), "groups": len(groups),
                       "spread": sum(max(g) > min(g) for g in groups.values()),
                       "failed": int(sum(bool(f) for f in failed)) if failed is not None else 0}
        self._reasons = sorted({str(f) for f in failed if f}) if failed is not None else []
        penalties = [p for row in data.non_tensor_batch.get("step_penalties", []) for p in (row or [])]
        if penalties:  # the policy's turns that the environment accepted (a penalised turn was rejected)
            self._batch["valid"] = sum(p == 0 for p in penalties) / len(penalties)

    def on_log(self, metrics: dict[str, Any], step: int) -> None:
        if "critic/score/mean" not in metrics:  # a validation-only log call
            return
        row = {"step": step, "reward": float(metrics["critic/score/mean"]),
               "loss": float(metrics.get("actor/pg_loss", float("nan"))),
               "seconds": float(metrics.get("timing_s/step", float("nan"))), **self._batch}
        self.history.append(row)
        valid = f"; valid actions: {row['valid']:.0%}" if "valid" in row else ""
        batch = (f" (groups with a reward spread: {row['spread']}/{row['groups']}; failed episodes: {row['failed']}"
                 f"{valid})" if self._batch else "")
        print(f"step {step}: reward {row['reward']:.4f}, loss {row['loss']:.4f}, {row['seconds']:.1f} s{batch}",
              flush=True)
        counts, self._batch = {**self._batch, "reasons": self._reasons}, {}
        if self.on_step is not None and "episodes" in counts:
            self.on_step(step, counts)

    def watch(self) -> None:
        """Wrap verl's Tracking.log in this process so every step's metrics reach `on_log`."""
        from verl.utils.tracking import Tracking

        original = getattr(Tracking.log, "__wrapped__", Tracking.log)

        @functools.wraps(original)
        def log(tracking, data, step, *args, **kwargs):
            result = original(tracking, data, step, *args, **kwargs)
            self.on_log(data, step)
            return result

        Tracking.log = log

    def finish(self) -> dict[str, Any]:
        """The last checkpoint verl wrote (its own `latest_checkpointed_iteration.txt`), the reward PNG and
        summary.json; prints the two paths."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        latest = self.out_dir / "latest_checkpointed_iteration.txt"
        checkpoint = self.out_dir / f"global_step_{latest.read_text().strip()}" if latest.is_file() else None
        png = plot(self.history, self.out_dir / "reward.png") if self.history else None
        summary = {"steps": [h["step"] for h in self.history], "history": self.history,
                   "checkpoint": str(checkpoint) if checkpoint else None, "plot": str(png) if png else None}
        (self.out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        print(f"checkpoint: {checkpoint if checkpoint else 'none (trainer.save_freq <= 0)'}", flush=True)
        print(f"reward plot: {png}", flush=True)
        return summary


def plot(history: list[dict[str, float]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([h["step"] for h in history], [h["reward"] for h in history], marker="o")
    ax.set_xlabel("step")
    ax.set_ylabel("mean reward")
    ax.set_title("GRPO: reward per step")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
