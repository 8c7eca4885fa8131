"""Start the policy's OpenAI-compatible server as a child process and stop it again.

vLLM (`vllm serve`) when a CUDA GPU and vLLM are there, as in training; otherwise the project's CPU server
(`agent_system.policy.server`: the training rollout's transformers backend, with the canvas grammar when the
action space is canvas). The caller gets the base URL and model name once the server answers `/v1/models`;
a server that dies or never answers is one line with the end of its output.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from aflow.plugins import PluginError
from agent_system.policy.server import text_name

START_TIMEOUT_S = 600  # loading a 7B model into vLLM takes minutes


class ServeError(PluginError):
    """The policy server could not be started; the message is one line."""


@dataclass(frozen=True)
class Endpoint:
    base_url: str
    model: str
    backend: str  # "vllm" or "cpu"
    text_model: str  # the same model, unconstrained (a model value's questions); = model without a grammar
    process: subprocess.Popen = field(repr=False, compare=False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gpu_backend() -> bool:
    """vLLM serves when this machine has a CUDA GPU and vLLM installed."""
    try:
        import torch

        if not torch.cuda.is_available():
            return False
        import vllm  # noqa: F401
    except ImportError:
        return False
    return True


def command(model_dir: Path, name: str, port: int, grammar: str | None, host: str = "127.0.0.1") -> tuple[list[str], str]:
    if gpu_backend():
        # vLLM does not know the canvas grammar; the GPU rollout of training does not constrain either
        return [str(Path(sys.executable).with_name("vllm")), "serve", str(model_dir), "--served-model-name", name,
                "--host", host, "--port", str(port)], "vllm"
    cmd = [sys.executable, "-m", "agent_system.policy.server", str(model_dir), "--host", host, "--port", str(port),
           "--model-name", name]
    return cmd + (["--grammar", grammar] if grammar else []), "cpu"


@contextlib.contextmanager
def started(model_dir: Path, name: str, grammar: str | None, port: int | None = None,
            timeout_s: float = START_TIMEOUT_S) -> Iterator[Endpoint]:
    """The server as a child process (its own process group, so that all of it stops) for the `with` body."""
    port = port or free_port()
    cmd, backend = command(model_dir, name, port, grammar)
    log = tempfile.TemporaryFile(mode="w+")
    process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    base_url = f"http://127.0.0.1:{port}/v1"
    try:
        _wait_ready(process, base_url, log, timeout_s, backend)
        text = text_name(name) if grammar and backend == "cpu" else name
        yield Endpoint(base_url, name, backend, text, process)
    finally:
        stop(process)
        log.close()


def _wait_ready(process: subprocess.Popen, base_url: str, log, timeout_s: float, backend: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ServeError(f"the policy server ({backend}) exited with status {process.returncode} before it "
                             f"answered: {_tail(log)}")
        try:
            with urllib.request.urlopen(f"{base_url}/models", timeout=5) as reply:
                if reply.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    stop(process)
    raise ServeError(f"the policy server ({backend}) did not answer {base_url}/models within {timeout_s:.0f} s: "
                     f"{_tail(log)}")


def _tail(log, lines: int = 3) -> str:
    log.flush()
    log.seek(0)
    text = [line.strip() for line in log.read().splitlines() if line.strip()]
    return " | ".join(text[-lines:])[-600:] or "(no output)"


def stop(process: subprocess.Popen, grace_s: float = 10.0) -> None:
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(grace_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
