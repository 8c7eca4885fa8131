"""What the counterfactual credit costs in reward signal at SmolLM2 scale (a benchmark, not a test).

    AFLOW_DATA_DIR=../shared/data/aflow python -m bench.reward_signal [--benchmark drop] [--problems 30]

With the embedded SmolLM2-135M executor, measures a few fixed canvases on the first `--problems`
problems of the benchmark's validate split, one problem at a time as query mode does (the
counterfactual replays the replies of the problem measured before), and prints per canvas: the
mean raw score (what the answers scored), the mean credit (what the environment pays), the share of
problems that scored but earned nothing (answers that came out the same without this problem's
replies), and the executor calls. The ensemble rows show what independent samples change.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

CANVASES = {
    "ANSWER": [],
    "ANSWER + FORMAT": ["ADD FORMAT"],
    "ENSEMBLE 1 3": ["ENSEMBLE 1 3"],
}


async def measure_all(benchmark: str, problems: int, data_dir) -> list[dict]:
    from aflow import canvas as cv
    from aflow import embedded
    from aflow.benchmarks import get_benchmark
    from aflow.config import LLMConfig
    from aflow.llm import LLMClient
    from aflow.sandbox import Sandbox
    from aflow.workflows import from_source
    from agent_system.config import EnvConfig
    from agent_system.environments.env_package.aflow.measure import Meter, measure

    bench = get_benchmark(benchmark)
    rows = bench.load("validate", data_dir, problems)
    report = []
    with embedded.start() as server:
        llm = LLMClient(LLMConfig(base_url=server.base_url, model=embedded.MODEL_NAME, max_tokens=96, cache=False))
        async with Sandbox() as sandbox:
            meter = Meter.of(EnvConfig(), llm, None).bound(bench, {}, sandbox)
            for name, edits in CANVASES.items():
                canvas = cv.replay(cv.initial(bench.is_code), edits)
                graph, prompt = cv.compile_canvas(canvas, bench.is_code)
                workflow = from_source(graph, prompt, name=name)
                raw, credit, calls, decoys = [], [], 0, []
                started = time.monotonic()
                for problem in rows:
                    scored, transcripts = await measure(workflow, [problem], meter, decoys=decoys[-1:])
                    raw.append(scored.raw)
                    credit.append(scored.score)
                    calls += scored.calls
                    decoys.extend(t for t in transcripts if t)
                lost = sum(1 for r, c in zip(raw, credit, strict=True) if r > 0 and c == 0)
                report.append({"canvas": name, "raw": statistics.fmean(raw), "credit": statistics.fmean(credit),
                               "scored": sum(r > 0 for r in raw), "lost": lost, "calls": calls,
                               "seconds": time.monotonic() - started})
        await llm.close()
    return report


def main() -> None:
    from aflow.benchmarks import resolve_data_dir

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--benchmark", default="drop")
    parser.add_argument("--problems", type=int, default=30)
    args = parser.parse_args()
    report = asyncio.run(measure_all(args.benchmark, args.problems, resolve_data_dir(None)))
    print(f"{args.benchmark}, {args.problems} problems, SmolLM2-135M executor (embedded)")
    print(f"{'canvas':<18}{'raw':>8}{'credit':>8}{'scored':>8}{'lost':>6}{'calls':>7}{'s':>7}")
    for row in report:
        print(f"{row['canvas']:<18}{row['raw']:>8.3f}{row['credit']:>8.3f}{row['scored']:>8}{row['lost']:>6}"
              f"{row['calls']:>7}{row['seconds']:>7.0f}")


if __name__ == "__main__":
    main()
