"""How close does `aflow evaluate` get to the latency bound, and what does a sandboxed run cost?

    python -m bench.evaluate_latency [--latency 1.0] [--n 1055] [--concurrency 32] [--data-dir DIR]

Part 1 starts the fake OpenAI server (tests/fake_openai.py) answering every call after a
fixed latency L and runs ``aflow evaluate --workflow builtin:io --no-cache`` on gsm8k/test
against it. With C calls in flight, no run can beat ``calls * L / C``; the ratio of the
run's own wall time (summary wall_s) to that bound is the overhead of everything else
(sandbox processes, scheduling, the client). Target: <= 1.10 at C = 32.

N defaults to the whole split (1055 problems), the size of a real evaluation. The run
has a fixed start-up cost (the zygote, the first C sandboxes: ~0.25 s here) and a small
cost per call cycle; with few problems the fixed part weighs more (at N = 128 and L = 1 s
the bound is only 4 s), so try ``--n 128`` to see the worst case.

Part 2 makes the same number of calls through ``LLMClient`` alone (no sandbox), to
separate the client's overhead from the rest.

Part 3 times a sandboxed code execution of a trivial function: K sequential runs (mean,
p50, p95 in ms, CPU per run), then K runs with 8 at a time (throughput per second), once
with a fresh interpreter per run and once forked from the zygote that `aflow evaluate` uses.
(With the zygote, the forked children's CPU is not visible to getrusage: its CPU figure
counts only the parent's share.)

Output is one ``name: value`` per line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from aflow.config import LLMConfig
from tests.fake_openai import FakeOpenAI

REPO = Path(__file__).resolve().parents[1]
SNIPPET = "def solve():\n    return 1"


def default_data_dir() -> str:
    return os.environ.get("AFLOW_DATA_DIR") or str(REPO.parent / "shared" / "data" / "aflow")


def emit(name: str, value) -> None:
    if isinstance(value, float):
        value = f"{value:.4f}" if abs(value) < 10 else f"{value:.2f}"
    print(f"{name}: {value}", flush=True)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def children_cpu_s() -> float:
    """CPU seconds (user + sys) of every waited-for descendant so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def evaluate_against_fake(latency: float, n: int, concurrency: int, data_dir: str, timeout: float) -> int:
    with FakeOpenAI(latency=latency, reply=lambda messages: "The answer is 42") as fake:
        env = {k: v for k, v in os.environ.items() if not k.startswith("AFLOW_")}
        command = [sys.executable, "-m", "aflow.cli", "evaluate", "--benchmark", "gsm8k", "--split", "test",
                   "--limit", str(n), "--concurrency", str(concurrency), "--workflow", "builtin:io", "--no-cache",
                   "--data-dir", data_dir, "--executor-base-url", fake.base_url, "--executor-model", "fake-model",
                   "--json"]
        cpu_before, started = children_cpu_s(), time.monotonic()
        result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)
        process_wall = time.monotonic() - started
        cpu = children_cpu_s() - cpu_before  # aflow and its sandbox processes
        requests, max_in_flight = fake.count, fake.max_in_flight
    if result.returncode != 0:
        print(f"aflow evaluate failed (exit {result.returncode}): {result.stderr.strip()[-500:]}", file=sys.stderr)
        return result.returncode or 1
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    calls = summary["calls"]
    bound = calls * latency / concurrency  # --concurrency bounds the executor calls in flight
    emit("latency_s", latency)
    emit("problems", summary["n"])
    emit("concurrency", concurrency)
    emit("errors", summary["errors"])
    emit("calls", calls)
    emit("server_requests", requests)
    emit("server_max_in_flight", max_in_flight)
    emit("wall_s", float(summary["wall_s"]))
    emit("process_wall_s", process_wall)
    emit("bound_s", bound)
    emit("ratio_wall_to_bound", summary["wall_s"] / bound if bound else float("nan"))
    emit("ratio_process_wall_to_bound", process_wall / bound if bound else float("nan"))
    # CPU the run needs, whatever the machine's load: on `cores` cores it cannot finish sooner
    cores = os.cpu_count() or 1
    emit("cores", cores)
    emit("process_cpu_s", cpu)
    emit("cpu_floor_s", cpu / cores)
    return 0


async def client_only(latency: float, n: int, concurrency: int) -> None:
    """The same calls through LLMClient alone (no sandbox, no scoring): the client's share."""
    from aflow.llm import LLMClient

    with FakeOpenAI(latency=latency) as fake:
        client = LLMClient(LLMConfig(base_url=fake.base_url, model="fake-model", cache=False,
                                     max_concurrency=concurrency))
        try:
            started = time.monotonic()
            await asyncio.gather(*(client.chat([{"role": "user", "content": f"problem {i}"}]) for i in range(n)))
            wall = time.monotonic() - started
        finally:
            await client.close()
    bound = n * latency / concurrency
    emit("client_only_wall_s", wall)
    emit("client_only_ratio_to_bound", wall / bound)


async def sandbox_overhead(k: int, parallel: int, zygote: bool) -> None:
    """K sequential runs, then K runs `parallel` at a time; `zygote` forks them from a
    pre-started interpreter (what `aflow evaluate` does) instead of starting each afresh."""
    from aflow.sandbox import Sandbox

    prefix = "sandbox_zygote" if zygote else "sandbox_fresh"
    async with Sandbox(use_zygote=zygote) as sandbox:
        await sandbox.run_code(SNIPPET, "solve")  # warm the page cache; not counted
        times = []
        cpu_before = children_cpu_s() + _self_cpu_s()
        for _ in range(k):
            started = time.perf_counter()
            result = await sandbox.run_code(SNIPPET, "solve")
            times.append((time.perf_counter() - started) * 1000)
            if not result.ok or str(result.value) != "1":
                raise SystemExit(f"the sandbox did not return 1: {result.error or result.value!r}")
        cpu_per_run = (children_cpu_s() + _self_cpu_s() - cpu_before) / k * 1000
        emit(f"{prefix}_runs", k)
        emit(f"{prefix}_mean_ms", statistics.fmean(times))
        emit(f"{prefix}_p50_ms", percentile(times, 50))
        emit(f"{prefix}_p95_ms", percentile(times, 95))
        emit(f"{prefix}_cpu_ms_per_run", cpu_per_run)

        semaphore = asyncio.Semaphore(parallel)

        async def one() -> bool:
            async with semaphore:
                return (await sandbox.run_code(SNIPPET, "solve")).ok

        started = time.perf_counter()
        results = await asyncio.gather(*(one() for _ in range(k)))
        elapsed = time.perf_counter() - started
    if not all(results):
        raise SystemExit(f"{results.count(False)} of {k} concurrent sandbox runs failed")
    emit(f"{prefix}_concurrency", parallel)
    emit(f"{prefix}_concurrent_wall_s", elapsed)
    emit(f"{prefix}_throughput_per_s", k / elapsed)


def _self_cpu_s() -> float:
    """CPU of this process, which does the parent's half of every sandbox run (and, with a
    zygote, the children are not ours to wait for: their CPU is not in RUSAGE_CHILDREN)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency", type=float, default=1.0, help="seconds per executor call (L)")
    parser.add_argument("--n", type=int, default=1055, help="problems (N; 1055 = all of gsm8k/test)")
    parser.add_argument("--concurrency", type=int, default=32, help="problems in flight (C)")
    parser.add_argument("--data-dir", default=default_data_dir())
    parser.add_argument("--sandbox-runs", type=int, default=50, help="K")
    parser.add_argument("--sandbox-concurrency", type=int, default=8)
    parser.add_argument("--timeout", type=float, default=600.0, help="give up on the evaluate run after this long")
    args = parser.parse_args(argv)
    emit("load_average_1m", os.getloadavg()[0])  # other work on the machine skews every time below
    status = evaluate_against_fake(args.latency, args.n, args.concurrency, args.data_dir, args.timeout)
    if status:
        return status
    asyncio.run(client_only(args.latency, args.n, args.concurrency))
    for zygote in (False, True):
        asyncio.run(sandbox_overhead(args.sandbox_runs, args.sandbox_concurrency, zygote))
    return 0


if __name__ == "__main__":
    sys.exit(main())
