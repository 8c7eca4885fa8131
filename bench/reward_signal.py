"""What the counterfactual credit costs in reward signal at SmolLM2 scale (a benchmark, not a test).

    AFLOW_DATA_DIR=../shared/data/aflow python -m bench.reward_signal [--benchmark drop] [--problems 30]

With the embedded SmolLM2-135M executor, measures a few fixed canvases on the first `--problems`
problems of the benchmark's validate split, one problem at a time as query mode does (the
counterfactual replays the replies of the problem measured before), and prints per canvas: the mean
AFlow score of the outputs (`aflow` F1 on QA), their mean `reward`-variant score (raw), the mean credit
(what the environment pays: raw less what the output scores without this problem's replies), how many
problems scored above 0 under each, and the executor calls. The ensemble row shows what independent
samples change.
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
                aflow, raw, credit, calls, decoys = [], [], [], 0, []
                started = time.monotonic()
                for problem in rows:
                    scored, transcripts = await measure(workflow, [problem], meter, decoys=decoys[-1:])
                    aflow.append((await bench.score(problem, scored.output, sandbox=sandbox, scoring="aflow"))[0])
                    raw.append(scored.raw)
                    credit.append(scored.score)
                    calls += scored.calls
                    decoys.extend(t for t in transcripts if t)
                report.append({"canvas": name, "aflow": statistics.fmean(aflow), "raw": statistics.fmean(raw),
                               "credit": statistics.fmean(credit), "aflow>0": sum(a > 0 for a in aflow),
                               "raw>0": sum(r > 0 for r in raw), "credit>0": sum(c > 0 for c in credit),
                               "calls": calls, "seconds": time.monotonic() - started})
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
    print(f"{'canvas':<18}{'aflow':>7}{'raw':>7}{'credit':>7}{'aflow>0':>8}{'raw>0':>7}{'credit>0':>9}"
          f"{'calls':>7}{'s':>6}")
    for row in report:
        print(f"{row['canvas']:<18}{row['aflow']:>7.3f}{row['raw']:>7.3f}{row['credit']:>7.3f}{row['aflow>0']:>8}"
              f"{row['raw>0']:>7}{row['credit>0']:>9}{row['calls']:>7}{row['seconds']:>6.0f}")


if __name__ == "__main__":
    main()
