"""The embedded executor as a user starts it: `aflow serve-executor`."""

import json
import signal
import socket
import subprocess
import sys
import urllib.request

import pytest

from aflow.embedded import free_port


@pytest.mark.slow
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
