"""How many llama.cpp threads should the embedded SmolLM2 executor use? (a benchmark, not a test)

    python -m bench.embedded_threads [--threads 1 2] [--answers 3]

For each thread count: the seconds of a 96-token answer, alone and while another process keeps
torch busy on the cores (as the trainer does during a CPU run). Measured on this repo's 2-core
machine: 1 thread 1.71-1.97 s alone, 1.78-2.04 s loaded; 2 threads 2.80-3.12 s alone, 4.15-60.47 s
loaded (the threads spin waiting for each other when a core is taken). Hence aflow.embedded's
default of 1.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import urllib.request

BUSY = "import torch, time\nx = torch.randn(800, 800)\nt = time.time()\nwhile time.time() - t < 600: x @ x\n"


def answer_seconds(base_url: str, model: str) -> float:
    body = json.dumps({"model": model, "max_tokens": 96, "temperature": 0, "messages": [
        {"role": "user", "content": "Janet has 3 apples and buys 5 more. How many apples? Think step by step."}]})
    request = urllib.request.Request(f"{base_url}/chat/completions", data=body.encode(),
                                     headers={"Content-Type": "application/json"})
    started = time.monotonic()
    urllib.request.urlopen(request, timeout=600).read()
    return time.monotonic() - started


def main() -> None:
    from aflow import embedded

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--answers", type=int, default=3)
    args = parser.parse_args()
    for threads in args.threads:
        with embedded.start(threads=threads) as server:
            answer_seconds(server.base_url, embedded.MODEL_NAME)  # warm-up
            alone = [answer_seconds(server.base_url, embedded.MODEL_NAME) for _ in range(args.answers)]
            busy = subprocess.Popen([sys.executable, "-c", BUSY])
            try:
                time.sleep(2)
                loaded = [answer_seconds(server.base_url, embedded.MODEL_NAME) for _ in range(args.answers)]
            finally:
                busy.kill()
                busy.wait()
        print(f"threads={threads}: alone {' '.join(f'{s:.2f}' for s in alone)} s; "
              f"next to a busy torch process {' '.join(f'{s:.2f}' for s in loaded)} s", flush=True)


if __name__ == "__main__":
    main()
