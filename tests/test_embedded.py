"""The embedded executor as a user starts it: `aflow serve-executor`."""

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from aflow.embedded import free_port


@pytest.mark.model
def test_serve_executor_answers_and_stops_on_signal():
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "aflow.cli", "serve-executor", "--port", str(port)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        base_url = process.stdout.readline().strip()
        assert base_url == f"http://127.0.0.1:{port}/v1"
        request = urllib.request.Request(
            f"{base_url}/chat/completions",
            data=json.dumps({"model": "smollm2-135m-instruct", "max_tokens": 16, "temperature": 0,
                             "messages": [{"role": "user", "content": "Say hello."}]}).encode(),
            headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            body = json.loads(response.read())
        assert body["choices"][0]["message"]["content"].strip()
        assert body["usage"]["completion_tokens"] > 0
    finally:
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=30)
    assert code == 0
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=2):
        pass


@pytest.mark.model
def test_the_server_dies_with_a_killed_parent():
    """A parent killed by SIGKILL (OOM, a test runner's timeout) cannot stop the server it started;
    the server must not live on, holding its port and a CPU."""
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "aflow.cli", "serve-executor", "--port", str(port)],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert process.stdout.readline().strip() == f"http://127.0.0.1:{port}/v1"
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    finally:
        process.kill()
        process.wait(timeout=30)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        except OSError:
            return
        time.sleep(0.2)
    pytest.fail(f"the embedded server still listens on {port} after its parent was killed")
