"""After a search: the best workflows on the test split, a markdown report and a plot."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from aflow.config import EvalConfig
from aflow.evaluate import evaluate
from aflow.files import atomic_write_text
from aflow.llm import LLMClient
from aflow.search.tree import Tree


def _stderr(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


async def test_best(tree: Tree, workspace: Path, benchmark: str, executor: LLMClient, data_dir: Path | None,
                    limit: int | None, concurrency: int, top: int = 3, scoring: str = "aflow",
                    log=_stderr, progress: bool = False) -> dict[int, float]:
    """Test-split score of the `top` best rounds by validation score, under the search's scoring
    variant; written to test_scores.json. `limit` caps the test problems of each (None: all);
    one line per workflow tested, and a progress bar when `progress`."""
    scores = {}
    ranked = tree.ranked()[:top]
    for i, node in enumerate(ranked, 1):
        config = EvalConfig(benchmark=benchmark, split="test", workflow=str(workspace / f"round_{node.round}"),
                            limit=limit, concurrency=concurrency, data_dir=data_dir,
                            out=workspace / f"round_{node.round}" / "test", scoring=scoring)
        started = time.monotonic()
        summary, _ = await evaluate(config, executor, progress=progress)
        scores[node.round] = summary.score
        cached = f" ({summary.cached_calls} answered from the cache)" if summary.cached_calls else ""
        log(f"test {i}/{len(ranked)}: round {node.round} scored {summary.score:.4f} on {summary.n} test problems, "
            f"{summary.calls} calls{cached}, ${summary.cost_usd:.4f}, {time.monotonic() - started:.1f}s")
    atomic_write_text(workspace / "test_scores.json", json.dumps(scores, indent=2) + "\n")
    return scores


def round_rows(results: dict) -> list[dict]:
    """Every round done, evaluated or rejected, in order: round, status, parent, mean, std,
    cost, calls, modification or reasons."""
    usage = results.get("round_usage", {})
    rows = []
    for r in results.get("rounds", []):
        rows.append({**r, "status": "evaluated", "usage": usage.get(str(r["round"]), {})})
    for r in results.get("rejected_rounds", []):
        rows.append({**r, "status": "rejected", "usage": usage.get(str(r["round"]), {})})
    return sorted(rows, key=lambda r: r["round"])


def plot(results: dict, path: Path, test_scores: dict[int, float] | None = None) -> None:
    """Top: each evaluated round's validation score (mean ± std, labelled), the tree's best so far
    as a line across every round, rejected rounds as crosses, test scores as stars. Bottom: what
    each round spent: cost in USD, or calls (the cache's answers stacked) when nothing was paid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    test_scores = {int(k): v for k, v in (test_scores or {}).items()}
    rows = round_rows(results)
    evaluated = [r for r in rows if r["status"] == "evaluated"]
    rejected = [r for r in rows if r["status"] == "rejected"]
    all_rounds = [r["round"] for r in rows]
    best, running, best_x = [], None, []
    for r in rows:  # the best validation score in the tree after each round, rejected rounds included
        if r["status"] == "evaluated":
            running = r["mean"] if running is None else max(running, r["mean"])
        if running is not None:
            best_x.append(r["round"])
            best.append(running)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 6.5), sharex=True, gridspec_kw={"height_ratios": [3, 2]})
    xs = [r["round"] for r in evaluated]
    top.errorbar(xs, [r["mean"] for r in evaluated], yerr=[r["std"] for r in evaluated], fmt="o", capsize=4,
                 label="validation score (mean ± std)", zorder=3)
    for r in evaluated:
        top.annotate(f"{r['mean']:.3f}", (r["round"], r["mean"]), textcoords="offset points", xytext=(6, 6), fontsize=8)
    if best_x:
        # extend the step to the right edge so a one-round search still shows a line, not a dot
        top.step(best_x + [best_x[-1] + 0.5], best + [best[-1]], where="post", color="tab:green",
                 label="best so far", zorder=2)
    if rejected:
        top.plot([r["round"] for r in rejected], [-0.04] * len(rejected), "x", color="tab:red", markersize=9,
                 label="rejected (no valid modification)", clip_on=False)
    if test_scores:
        tx = sorted(test_scores)
        top.plot(tx, [test_scores[x] for x in tx], "*", color="tab:orange", markersize=13, label="test score", zorder=4)
        for x in tx:
            top.annotate(f"test {test_scores[x]:.3f}", (x, test_scores[x]), textcoords="offset points",
                         xytext=(6, -12), fontsize=8, color="tab:orange")
    top.set_ylim(-0.09, 1.12)
    top.set_ylabel("score")
    top.grid(alpha=0.3)
    top.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    usage = [r.get("usage", {}) for r in rows]
    costs = [u.get("cost_usd", r.get("cost_usd", 0.0)) for u, r in zip(usage, rows, strict=True)]
    if any(c > 0 for c in costs):
        bottom.bar(all_rounds, costs, color="tab:blue")
        bottom.set_ylabel("cost of the round (USD)")
        total = results.get("totals", {}).get("cost_usd", sum(costs))
        bottom.set_title(f"total ${total:.4f}", fontsize=9)
    else:
        calls = [u.get("calls", r.get("calls", 0)) for u, r in zip(usage, rows, strict=True)]
        cached = [u.get("cached", 0) for u in usage]
        bottom.bar(all_rounds, calls, color="tab:blue", label="calls sent")
        bottom.bar(all_rounds, cached, bottom=calls, color="tab:gray", label="answered from the cache")
        bottom.set_ylabel("calls in the round")
        bottom.set_title("cost $0 (local or cached endpoint): calls per round instead", fontsize=9)
        bottom.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    bottom.set_xlabel("round")
    bottom.set_xticks(all_rounds or [1])
    if all_rounds:
        bottom.set_xlim(min(all_rounds) - 0.6, max(all_rounds) + 0.8)
    fig.suptitle(f"aflow optimize: {results['benchmark']} ({results.get('scoring', 'aflow')} scoring), "
                 f"{results.get('rounds_done', len(rows))} rounds")
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def _cell(text: str, size: int = 160) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")[:size]


def write_report(results: dict, test_scores: dict[int, float], workspace: Path) -> None:
    test_scores = {int(k): v for k, v in test_scores.items()}
    rows = round_rows(results)
    totals = results["totals"]
    cached = f" ({totals.get('cached', 0)} answered from the cache)" if totals.get("cached") else ""
    n_rejected = sum(r["status"] == "rejected" for r in rows)
    lines = [f"# aflow optimize: {results['benchmark']}", "",
             f"Rounds done: {results['rounds_done']} ({len(rows) - n_rejected} evaluated, {n_rejected} rejected); "
             f"best round {results['best_round']} (validation {results['best_validation_score']:.4f}"
             + (f", test {test_scores[results['best_round']]:.4f}" if results["best_round"] in test_scores else "")
             + f"); total cost ${totals['cost_usd']:.4f}, {totals['calls']} calls{cached}"
             + ("; converged" if results.get("converged") else "") + ".", "",
             "| round | parent | status | validation (mean ± std) | test | cost (USD) | calls | "
             "modification, or why it was rejected |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        usage = r.get("usage", {})
        cost = usage.get("cost_usd", r.get("cost_usd", 0.0))
        calls = usage.get("calls", r.get("calls", 0))
        calls = f"{calls}" + (f" (+{usage['cached']} cached)" if usage.get("cached") else "")
        parent = r["parent"] if r.get("parent") is not None else "-"
        if r["status"] == "evaluated":
            test = f"{test_scores[r['round']]:.4f}" if r["round"] in test_scores else ""
            lines.append(f"| {r['round']} | {parent} | evaluated | {r['mean']:.4f} ± {r['std']:.4f} | {test} | "
                         f"{cost:.4f} | {calls} | {_cell(r['modification'])} |")
        else:
            reasons = r.get("reasons") or ["no answer"]
            why = f"{len(reasons)} optimizer answer(s) rejected; last: {reasons[-1]}"
            lines.append(f"| {r['round']} | {parent} | rejected | - | | {cost:.4f} | {calls} | {_cell(why, 240)} |")
    lines += ["", "![scores and cost per round](plot.png)", ""]
    atomic_write_text(workspace / "report.md", "\n".join(lines))
