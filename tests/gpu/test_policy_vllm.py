"""On a CUDA machine `aflow policy serve` serves with vLLM (the CPU server is tested everywhere else: see
tests/test_policy.py). The model is the embedded SmolLM2, converted to a Hugging Face directory. Skipped
without CUDA or vLLM.

    bash tests/run.sh tests/gpu -m gpu
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)
pytest.importorskip("vllm")

pytestmark = pytest.mark.gpu


@pytest.mark.timeout(1200)
def test_aflow_policy_serve_uses_vllm_on_a_gpu():
    from openai import OpenAI

    from agent_system.policy_model import ensure_default_converted

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([str(Path(sys.executable).with_name("aflow")), "policy", "serve",
                               str(ensure_default_converted()), "--port", str(port), "--model-name", "smollm2"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        base_url = server.stdout.readline().strip()
        assert base_url == f"http://127.0.0.1:{port}/v1", server.stderr.read()[-3000:]
        client = OpenAI(base_url=base_url, api_key="none")
        reply = client.chat.completions.create(model="smollm2", max_tokens=8,
                                               messages=[{"role": "user", "content": "Say hi."}])
        assert reply.choices[0].message.content
        assert "vllm backend" in server.stderr.readline()
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(60)
