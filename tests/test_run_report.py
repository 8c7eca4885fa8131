"""The run report's per-step line (recipes/run_report.py), from a batch shaped like verl's at the advantage step."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import torch

from recipes.run_report import RunReport


def column(values) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


def test_the_step_line_counts_spread_groups_failures_and_accepted_actions(tmp_path, capsys):
    rewards = torch.zeros(4, 3)
    rewards[:, -1] = torch.tensor([0.5, 0.5, -0.1, 0.4])  # group a: no spread; group b: spread
    batch = SimpleNamespace(batch={"token_level_rewards": rewards}, non_tensor_batch={
        "uid": column(["a", "a", "b", "b"]),
        "episode_failed": column(["", "", "", "worker died"]),
        "step_penalties": column([[0.0, 0.0], [0.0], [0.1, 0.1, 0.0], []]),
    })
    report = RunReport(tmp_path)
    report.on_batch(batch)
    report.on_log({"critic/score/mean": 0.325, "actor/pg_loss": -0.01, "timing_s/step": 12.0}, step=1)
    line = capsys.readouterr().out.strip()
    assert line == ("step 1: reward 0.3250, loss -0.0100, 12.0 s (groups with a reward spread: 1/2; "
                    "failed episodes: 1; valid actions: 67%)")
    report.on_log({"val-core/x": 1.0}, step=1)  # a validation-only log: no line
    assert capsys.readouterr().out == ""
    summary = report.finish()
    assert summary["history"][0]["valid"] == 4 / 6 and summary["checkpoint"] is None
    assert json.loads((tmp_path / "summary.json").read_text())["history"][0]["spread"] == 1
    assert (tmp_path / "reward.png").stat().st_size > 1000
