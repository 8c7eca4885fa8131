"""After a search: the best workflows on the test split, a markdown report and a plot."""

from __future__ import annotations

import json
from pathlib import Path

from aflow.config import EvalConfig
from aflow.evaluate import evaluate
from aflow.files import atomic_write_text
from aflow.llm import LLMClient
from aflow.search.tree import Tree


async def test_best(tree: Tree, workspace: Path, benchmark: str, executor: LLMClient, data_dir: Path | None,
                    limit: int | None, concurrency: int, top: int = 3, scoring: str = "aflow") -> dict[int, float]:
    """Test-split score of the `top` best rounds by validation score, under the search's scoring
    variant; written to test_scores.json."""
    scores = {}
    for node in tree.ranked()[:top]:
        config = EvalConfig(benchmark=benchmark, split="test", workflow=str(workspace / f"round_{node.round}"),
                            limit=limit, concurrency=concurrency, data_dir=data_dir,
                            out=workspace / f"round_{node.round}" / "test", scoring=scoring)
        summary, _ = await evaluate(config, executor, progress=False)
        scores[node.round] = summary.score
    atomic_write_text(workspace / "test_scores.json", json.dumps(scores, indent=2) + "\n")
    return scores


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = results["rounds"]
    xs = [r["round"] for r in rounds]
    means = [r["mean"] for r in rounds]
    best, running = [], 0.0
    for value in means:
        running = max(running, value)
        best.append(running)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    top.errorbar(xs, means, yerr=[r["std"] for r in rounds], fmt="o", label="validation score (mean ± std)")
    top.step(xs, best, where="post", label="best so far")
    top.set_ylabel("score")
    top.legend(loc="lower right")
    bottom.bar(xs, [r["cost_usd"] for r in rounds])
    bottom.set_ylabel("cost per round (USD)")
    bottom.set_xlabel("round")
    fig.suptitle(f"aflow optimize: {results['benchmark']}")
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def write_report(results: dict, test_scores: dict[int, float], workspace: Path) -> None:
    lines = [f"# aflow optimize: {results['benchmark']}", "",
             f"Rounds done: {results['rounds_done']}; best round {results['best_round']} "
             f"(validation {results['best_validation_score']:.4f}); total cost ${results['totals']['cost_usd']:.4f}, "
             f"{results['totals']['calls']} calls.", "",
             "| round | parent | validation (mean ± std) | test | cost (USD) | modification |",
             "|---|---|---|---|---|---|"]
    for r in results["rounds"]:
        test = f"{test_scores[r['round']]:.4f}" if r["round"] in test_scores else ""
        modification = r["modification"].replace("|", "\\|").replace("\n", " ")[:120]
        lines.append(f"| {r['round']} | {r['parent'] if r['parent'] is not None else '-'} | "
                     f"{r['mean']:.4f} ± {r['std']:.4f} | {test} | {r['cost_usd']:.4f} | {modification} |")
    lines += ["", "![scores and cost per round](plot.png)", ""]
    atomic_write_text(workspace / "report.md", "\n".join(lines))
