"""Shared fixtures. Benchmark data comes from --data-dir or $AFLOW_DATA_DIR (never from the repo)."""

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


@pytest.fixture(scope="session", autouse=True)
def private_response_cache(tmp_path_factory):
    """Executor responses are cached under $XDG_CACHE_HOME/aflow: tests get a cache of their own,
    so a reply cached by one test (or by a user's runs) never stands in for a request another
    test expects to reach its server. The converted policy model stays in the user's cache."""
    saved = {k: os.environ.get(k) for k in ("XDG_CACHE_HOME", "XDG_CONFIG_HOME")}
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg-cache"))
    # and no user config file (~/.config/aflow/config.toml) reaches a test's `aflow` command
    os.environ["XDG_CONFIG_HOME"] = str(tmp_path_factory.mktemp("xdg-config"))
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def pytest_addoption(parser):
    parser.addoption("--data-dir", default=None, help="AFlow JSONL directory (default: $AFLOW_DATA_DIR)")


@pytest.fixture(scope="session")
def data_dir(request) -> Path:
    value = request.config.getoption("--data-dir") or os.environ.get("AFLOW_DATA_DIR")
    if not value or not Path(value).is_dir():
        pytest.skip("no benchmark data: pass --data-dir or set AFLOW_DATA_DIR")
    return Path(value)


@pytest.fixture
def gsm8k(data_dir) -> Path:
    """gsm8k_validate.jsonl from the data directory (`data_dir` skips without one)."""
    path = data_dir / "gsm8k_validate.jsonl"
    if not path.is_file():
        pytest.skip(f"no {path}")
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
