"""What a user of AFlow, verl or TRL looks for in a CLI (issue 12): a config file for endpoints
instead of flags on every call, and TensorBoard/wandb for `evaluate` and `optimize` as the trainer
has. Real `aflow` subprocesses, a real local OpenAI-compatible server, real event files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from aflow.embedded import free_port
from tests.fake_openai import FakeOpenAI
from tests.test_cli_trust import env_for, gold_reply, one_line_error, rows_of
from tests.test_optimize_trust import optimize, reply_with

REPO = Path(__file__).resolve().parents[1]


def aflow(tmp_path: Path, *args: str, env: dict | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "aflow.cli", *args], capture_output=True, text=True,
                          env={**env_for(tmp_path), **(env or {})}, cwd=REPO, timeout=timeout)


def write_config(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def scalars(directory: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(directory))
    accumulator.Reload()
    return {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}


# ---- the config file ------------------------------------------------------------------------

def test_the_config_file_names_the_executor_its_key_variable_and_the_data(tmp_path, gsm8k):
    with FakeOpenAI() as fake:
        fake.reply = gold_reply(rows_of(gsm8k, 2))
        config = write_config(tmp_path / "xdg-config" / "aflow" / "config.toml", f"""
data_dir = "{gsm8k.parent}"
[executor]
base_url = "{fake.base_url}"
model = "from-the-file"
api_key_env = "MY_EXECUTOR_KEY"
""")
        # the default location ($XDG_CONFIG_HOME/aflow/config.toml), no endpoint or data flag at all
        result = aflow(tmp_path, "evaluate", "--benchmark", "gsm8k", "--limit", "2", "--no-cache", "--json",
                       env={"XDG_CONFIG_HOME": str(tmp_path / "xdg-config"), "MY_EXECUTOR_KEY": "sk-test-123"})
        chats = [r for r in fake.requests if r.path.endswith("/chat/completions")]
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"aflow: from {config}: executor, data_dir" in result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1])["score"] == 1.0
    assert chats and all(r.body["model"] == "from-the-file" for r in chats)
    assert all(r.headers.get("authorization") == "Bearer sk-test-123" for r in chats)


def test_the_command_line_wins_over_the_file_role_by_role(tmp_path, gsm8k):
    dead = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    config = write_config(tmp_path / "config.toml", f'[executor]\nbase_url = "{dead}"\nmodel = "file-model"\n')
    with FakeOpenAI() as fake:
        fake.reply = gold_reply(rows_of(gsm8k, 1))
        result = aflow(tmp_path, "evaluate", "--benchmark", "gsm8k", "--limit", "1", "--no-cache",
                       "--data-dir", str(gsm8k.parent), "--config", str(config),
                       "--executor-base-url", fake.base_url, "--executor-model", "flag-model")
        models = {r.body["model"] for r in fake.requests if r.body}
    assert result.returncode == 0, result.stderr[-2000:]
    assert models == {"flag-model"}  # the file's model is not mixed with the flag's URL
    assert "from " not in result.stderr  # nothing was taken from the file


@pytest.mark.parametrize("text,fragment", [
    ('[executor]\nbase_url = "http://127.0.0.1:1/v1"\nmodel = "m"\napi_key = "sk-secret"\n',
     "keys are not read from files"),
    ('[executor]\nbase_url = "http://127.0.0.1:1/v1"\nmodle = "m"\n', "unknown key 'modle'"),
    ('[exector]\nbase_url = "http://127.0.0.1:1/v1"\n', "unknown key 'exector'"),
    ('[executor]\nbase_url = "http://127.0.0.1:1/v1"\n', "needs both base_url and model"),
    ('[executor\n', "cannot be read"),
])
def test_a_bad_config_file_is_one_line_and_exit_2(tmp_path, gsm8k, text, fragment):
    config = write_config(tmp_path / "config.toml", text)
    result = aflow(tmp_path, "evaluate", "--benchmark", "gsm8k", "--limit", "1", "--data-dir", str(gsm8k.parent),
                   "--config", str(config))
    line = one_line_error(result, str(config), fragment)
    assert "sk-secret" not in line


def test_a_named_config_file_that_does_not_exist_is_a_setup_error(tmp_path, gsm8k):
    result = aflow(tmp_path, "evaluate", "--benchmark", "gsm8k", "--data-dir", str(gsm8k.parent),
                   env={"AFLOW_CONFIG": str(tmp_path / "nope.toml")})
    one_line_error(result, "nope.toml", "$AFLOW_CONFIG", "does not exist")


# ---- loggers ----------------------------------------------------------------------------------

def test_evaluate_logs_its_summary_to_tensorboard(tmp_path, gsm8k):
    out = tmp_path / "out"
    with FakeOpenAI() as fake:
        fake.reply = gold_reply(rows_of(gsm8k, 3)[:2])  # 2 of 3 right
        result = aflow(tmp_path, "evaluate", "--benchmark", "gsm8k", "--limit", "3", "--no-cache", "--json",
                       "--data-dir", str(gsm8k.parent), "--out", str(out), "--logger", "console,tensorboard",
                       "--executor-base-url", fake.base_url, "--executor-model", "m")
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    logged = scalars(out / "tensorboard")
    assert logged["evaluate/score"] == [(3, pytest.approx(summary["score"]))]
    assert summary["score"] == pytest.approx(2 / 3)
    assert logged["evaluate/calls"] == [(3, summary["calls"])]


def test_a_logger_that_cannot_start_stops_the_run_before_it_starts(tmp_path, gsm8k):
    with FakeOpenAI() as fake:
        no_dir = aflow(tmp_path, "evaluate", "--benchmark", "gsm8k", "--limit", "1", "--data-dir", str(gsm8k.parent),
                       "--logger", "tensorboard", "--executor-base-url", fake.base_url, "--executor-model", "m")
        unknown = aflow(tmp_path, "evaluate", "--benchmark", "gsm8k", "--data-dir", str(gsm8k.parent),
                        "--logger", "tensorbored")
        calls = fake.count
    one_line_error(no_dir, "--logger tensorboard needs --out")
    one_line_error(unknown, "unknown logger 'tensorbored'")
    assert calls == 0


def test_wandb_without_the_package_is_one_line(tmp_path, gsm8k):
    # wandb as the CLI finds it where the package is missing, installed here or not: its import fails
    hidden = tmp_path / "no-wandb" / "wandb"
    hidden.mkdir(parents=True)
    (hidden / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'wandb'\", name='wandb')\n")
    result = aflow(tmp_path, "evaluate", "--benchmark", "gsm8k", "--data-dir", str(gsm8k.parent),
                   "--out", str(tmp_path / "out"), "--logger", "wandb",
                   env={"PYTHONPATH": f"{hidden.parent}{os.pathsep}{REPO}"})
    one_line_error(result, "--logger wandb needs the wandb package")


def test_optimize_logs_every_round_to_metrics_jsonl_and_tensorboard(tmp_path, data_dir):
    rows = rows_of(data_dir / "gsm8k_validate.jsonl", 3)
    workspace = tmp_path / "ws"
    with FakeOpenAI() as server:
        server.reply = reply_with({row["question"]: row["answer"] for row in rows})
        args = optimize(workspace, server, "--rounds", "3", "--logger", "tensorboard", data_dir=data_dir)
        result = subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=REPO, env=env_for(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    final = json.loads(result.stdout.strip().splitlines()[-1])
    lines = [json.loads(line) for line in (workspace / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2, 3]
    assert lines[-1]["search/best_score"] == pytest.approx(final["best_validation_score"])
    assert all(line["search/accepted"] == 1.0 and "search/round_score" in line for line in lines)
    logged = scalars(workspace / "tensorboard")
    assert [step for step, _ in logged["search/best_score"]] == [1, 2, 3]
    assert [v for _, v in logged["search/round_score"]] == pytest.approx([line["search/round_score"] for line in lines])
