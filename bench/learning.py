"""Does the SmolLM2 policy learn to design workflows with canvas actions? A learning benchmark (not a test).

    AFLOW_DATA_DIR=../shared/data/aflow python -m bench.learning [--benchmark drop] [--steps 4]
        [--train-problems 64] [--heldout 16] [--batch 2] [--n 3] [--lr 1e-5] [--skip-control] [--out DIR]

With the defaults it ran 2343 s on 2 CPU cores (a DROP step of 2 problems x 3 episodes takes 2.5-4 min:
long passages make every prompt long for the policy's log-probs and the executor alike); the result is in
the README.

What it runs, all on this machine with the embedded SmolLM2-135M as policy and executor:

1. Data: query-mode canvas rows (`data_prep.build --action-space canvas`): training rows from the
   benchmark's validate split, held-out rows = the first `--heldout` problems of its test split, never
   trained on (data_prep drops training rows whose problem equals a test problem).
2. Baselines on those held-out problems: `aflow evaluate --workflow builtin:io` and `builtin:cot`.
3. Training: verl's RayPPOTrainer on the CPU (preset cpu-local, GRPO, constrained canvas decoding) for
   `--steps` steps at `--lr`, validating on the held-out rows before the first step (the untrained policy)
   and after the last (the trained policy); then the same run at lr=0 (the control: what sampling alone
   gives, with everything else equal). The control does not validate before its first step: its weights
   are the trained run's starting weights and validation decodes greedily, so that row would repeat the
   untrained one; its validation after the last step measures how much the held-out score moves between
   two evaluations of the same weights (the executor samples).
4. Report: per step the training reward and the valid-action rate of both runs (`learning.png`), and the
   held-out table: mean score of the final workflows with a 95% confidence interval (normal approximation
   over problems; a bootstrap would add nothing at this n) for builtin:io, builtin:cot, the untrained
   policy, the trained policy and the control. The policy's held-out score is its final canvas's score on
   the problem (the episode return, without the format penalty). Validation decodes greedily.

Why DROP by default: with a 135M executor most answers are wrong on GSM8K, MATH and the code
benchmarks whatever the workflow, so there is nothing for a workflow to win. DROP is scored by F1 over
short extractive answers: a weak executor that rambles gets little, and a workflow that forces a short,
formatted answer (ANSWER's extraction, a FORMAT step) earns partial credit, so workflow choice moves the
score. `--benchmark` takes any other.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESPONSE_TOKENS = 192  # two canvas actions and the environment's reply between them (as preset cpu-local)


def run(argv: list[str], log: Path, env: dict | None = None) -> None:
    """A step of the benchmark in a subprocess, its output in `log`; a failure stops the benchmark."""
    with log.open("w") as out:
        proc = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env or os.environ.copy())
    if proc.returncode != 0:
        tail = log.read_text().strip().splitlines()[-5:]
        sys.exit(f"bench.learning: {' '.join(argv[:4])} ... exited {proc.returncode}:\n" + "\n".join(tail))


def interval(scores: list[float]) -> tuple[float, float]:
    """(mean, half-width of the 95% normal-approximation interval)."""
    if not scores:
        return float("nan"), float("nan")
    mean = statistics.fmean(scores)
    if len(scores) < 2:
        return mean, float("nan")
    return mean, 1.96 * statistics.stdev(scores) / math.sqrt(len(scores))


def prompt_fits(tokenizer, max_prompt_length: int):
    """verl's `data.filter_overlong_prompts` rule (the chat-templated prompt's token count), so the
    held-out problems the baselines are scored on are exactly the ones verl validates on."""
    def fits(messages) -> bool:
        text = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)
        return len(tokenizer(text, add_special_tokens=False)["input_ids"]) <= max_prompt_length
    return fits


def build_data(args, data: Path) -> tuple[Path, Path, list[str]]:
    import pandas as pd
    from transformers import AutoTokenizer

    from agent_system.policy_model import load_policy, resolve_cache_dir

    if not (data / "heldout.parquet").is_file():
        run([sys.executable, "-m", "data_prep.build", "--benchmarks", args.benchmark, "--mode", "query",
             "--action-space", "canvas", "--out", str(data), "--data-dir", args.data_dir], data.parent / "data.log")
    if not (resolve_cache_dir() / "config.json").is_file():
        load_policy(None)  # the embedded SmolLM2, converted once (the policy the runs train)
    fits = prompt_fits(AutoTokenizer.from_pretrained(str(resolve_cache_dir())), args.max_prompt_length)
    train = pd.read_parquet(data / "train.parquet")
    train = train[train["prompt"].map(fits)].head(args.train_problems)
    heldout = pd.read_parquet(data / "val.parquet").head(args.heldout)
    heldout = heldout[heldout["prompt"].map(fits)]
    train.to_parquet(data / "train-subset.parquet")
    heldout.to_parquet(data / "heldout.parquet")
    ids = [str(extra["problem_id"]) for extra in heldout["extra_info"]]
    return data / "train-subset.parquet", data / "heldout.parquet", ids


def baseline(args, workflow: str, out: Path, ids: list[str]) -> list[float]:
    """Per-problem scores of a builtin workflow on the held-out problems (same scoring as the environment);
    an earlier run's results in `out` are reused."""
    if not (out / "results.jsonl").is_file():
        run([sys.executable, "-m", "aflow.cli", "evaluate", "--benchmark", args.benchmark, "--split", "test",
             "--limit", str(args.heldout), "--workflow", workflow, "--scoring", "reward",
             "--data-dir", args.data_dir, "--out", str(out)], out.parent / f"{out.name}.log")
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines() if line.strip()]
    by_id = {str(r["id"]): float(r["score"]) for r in records}
    missing = [i for i in ids if i not in by_id]
    if missing:
        sys.exit(f"bench.learning: {workflow} has no score for held-out problems {missing[:3]} "
                 "(the test split's order differs from the parquet's)")
    return [by_id[i] for i in ids]


def train(args, name: str, lr: float, train_file: Path, heldout: Path, ids: list[str], out: Path,
          validate_first: bool) -> dict:
    """One verl run; its per-step history and the held-out scores (before the first step when
    `validate_first`, and after the last), checked to cover the baselines' problems `ids`."""
    overrides = [
        "preset=cpu-local", f"data.train_files={train_file}", f"data.val_files={heldout}",
        f"data.train_batch_size={args.batch}", f"actor_rollout_ref.rollout.n={args.n}",
        f"actor_rollout_ref.actor.ppo_mini_batch_size={args.batch}", f"actor_rollout_ref.actor.optim.lr={lr}",
        f"trainer.total_training_steps={args.steps}", f"trainer.val_before_train={str(validate_first).lower()}",
        f"trainer.test_freq={args.steps}", f"trainer.save_freq={args.steps}", f"trainer.default_local_dir={out}",
        f"trainer.validation_data_dir={out / 'validation'}", f"trainer.experiment_name=learning-{name}",
        f"env.data_dir={args.data_dir}", "data.filter_overlong_prompts=true",
        f"data.max_prompt_length={args.max_prompt_length}",
        f"data.max_response_length={RESPONSE_TOKENS}",
        f"actor_rollout_ref.rollout.max_model_len={args.max_prompt_length + RESPONSE_TOKENS}",
        f"actor_rollout_ref.rollout.max_num_batched_tokens={args.max_prompt_length + RESPONSE_TOKENS}",
        f"actor_rollout_ref.rollout.max_num_seqs={args.batch * args.n}",
    ]
    env = {**os.environ, "AFLOW_RUNS_DIR": str(out / "runs")}
    env.pop("RAY_ADDRESS", None)
    wall = out / "wall_seconds.txt"
    if not (out / "summary.json").is_file():  # else an earlier run's, reused
        started = time.monotonic()
        run([sys.executable, "-m", "recipes.train", *overrides], out.parent / f"{name}.log", env)
        wall.write_text(f"{time.monotonic() - started:.0f}\n")
    summary = json.loads((out / "summary.json").read_text())
    dumps = sorted((out / "validation").glob("*.jsonl"), key=lambda p: int(p.stem))
    validations, valid_rates, rejections = {}, {}, {}
    for dump in dumps:
        rows = [json.loads(line) for line in dump.read_text().splitlines() if line.strip()]
        # an episode the environment failed ran no workflow: it counts as 0 (NaN in the dump)
        validations[int(dump.stem)] = [_number(r["episode_return"]) for r in rows]
        valid_rates[int(dump.stem)] = [_number(r.get("valid_actions", float("nan"))) for r in rows]
        rejections[int(dump.stem)] = {k[len("rejected_"):]: statistics.fmean(_number(r[k]) for r in rows)
                                      for k in rows[0] if k.startswith("rejected_")} if rows else {}
        if len(rows) != len(ids):
            sys.exit(f"bench.learning: {name} validated {len(rows)} problems at step {dump.stem}, the baselines "
                     f"{len(ids)}: verl's prompt filter and prompt_fits disagree")
    return {"history": summary["history"], "validations": validations, "valid_rates": valid_rates,
            "rejections": rejections, "checkpoint": out if (out / "latest_checkpointed_iteration.txt").is_file() else None,
            "seconds": float(wall.read_text()) if wall.is_file() else float("nan")}


def _number(value) -> float:
    return float(value) if value == value else 0.0  # NaN (a failed episode) counts 0


def search(args, policy: Path, out: Path) -> dict:
    """`aflow optimize --optimizer-policy POLICY` (the same rounds, seed and problems for every policy), then
    `--test` on the held-out problems: the score of the workflows the policy finds as a search's optimizer."""
    if not (out / "result.json").is_file():
        log = out.parent / f"{out.name}.log"
        run([sys.executable, "-m", "aflow.cli", "optimize", "--benchmark", args.benchmark, "--action-space", "canvas",
             "--optimizer-policy", str(policy), "--workspace", str(out / "workspace"), "--rounds",
             str(args.search_rounds), "--limit", str(args.search_problems), "--validation-rounds", "1",
             "--seed", "0", "--scoring", "reward", "--test", "--test-limit", str(args.heldout),
             "--data-dir", args.data_dir, "--json"], log)
        out.mkdir(parents=True, exist_ok=True)
        (out / "result.json").write_text([line for line in log.read_text().splitlines() if line.startswith("{")][-1])
    result = json.loads((out / "result.json").read_text())
    expansions = [json.loads(line) for line in (out / "workspace" / "expansions.jsonl").read_text().splitlines()]
    return {"test_score": result.get("test_score"), "best_validation": result.get("best_validation_score"),
            "valid_edits": sum(e["valid"] for e in expansions) / max(1, len(expansions)),
            "rejections": sorted({e["rejection"] for e in expansions if e.get("rejection")})}


def plot(runs: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (reward, valid) = plt.subplots(1, 2, figsize=(10, 3.5))
    for name, result in runs.items():
        steps = [h["step"] for h in result["history"]]
        reward.plot(steps, [h["reward"] for h in result["history"]], marker="o", label=name)
        valid.plot(steps, [h.get("valid", float("nan")) for h in result["history"]], marker="o", label=name)
    reward.set(xlabel="step", ylabel="mean training reward", title="reward per step")
    valid.set(xlabel="step", ylabel="valid actions", title="valid-action rate", ylim=(0, 1.05))
    for ax in (reward, valid):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--benchmark", default="drop")
    parser.add_argument("--data-dir", default=os.environ.get("AFLOW_DATA_DIR"))
    parser.add_argument("--train-problems", type=int, default=64)
    parser.add_argument("--heldout", type=int, default=16)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=2, help="problems per step")
    parser.add_argument("--n", type=int, default=3, help="episodes per problem (the GRPO group)")
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--max-prompt-length", type=int, default=1024)
    parser.add_argument("--skip-control", action="store_true")
    parser.add_argument("--search-rounds", type=int, default=4,
                        help="rounds of `aflow optimize` with each policy as the optimizer (0: no search)")
    parser.add_argument("--search-problems", type=int, default=8, help="validation problems of those searches")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / f"learning-{time.strftime('%Y%m%d-%H%M%S')}")
    args = parser.parse_args(argv)
    if not args.data_dir:
        sys.exit("bench.learning: pass --data-dir or set AFLOW_DATA_DIR (the benchmark's AFlow splits)")
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    train_file, heldout, ids = build_data(args, args.out / "data")
    table = {workflow: baseline(args, workflow, args.out / workflow.replace(":", "-"), ids)
             for workflow in ("builtin:io", "builtin:cot")}
    runs = {"trained": train(args, "trained", args.lr, train_file, heldout, ids, args.out / "trained", True)}
    if not args.skip_control:
        runs["control (lr=0)"] = train(args, "control", 0.0, train_file, heldout, ids, args.out / "control", False)
    trained = runs["trained"]["validations"]
    table["policy, untrained"] = trained.get(min(trained), [])
    table["policy, trained"] = trained.get(max(trained), [])
    if "control (lr=0)" in runs:
        control = runs["control (lr=0)"]["validations"]
        table["policy, lr=0 control"] = control.get(max(control), [])
    plot(runs, args.out / "learning.png")
    searches = {}
    if args.search_rounds > 0:
        from agent_system.policy_model import resolve_cache_dir

        searches["policy, untrained"] = search(args, resolve_cache_dir(), args.out / "search-untrained")
        if runs["trained"]["checkpoint"] is not None:
            searches["policy, trained"] = search(args, runs["trained"]["checkpoint"], args.out / "search-trained")

    print(f"benchmark: {args.benchmark}; {args.steps} steps x {args.batch} problems x {args.n} episodes; "
          f"lr {args.lr}; held-out problems: {len(ids)} (test split, never trained on)")
    for name, result in runs.items():
        curve = " ".join(f"{h['reward']:+.3f}" for h in result["history"])
        valid = " ".join(f"{h.get('valid', float('nan')):.2f}" for h in result["history"])
        print(f"{name}: reward per step {curve}; valid-action rate {valid}; {result['seconds']:.0f} s")
    print("held-out mean score (95% CI):")
    for name, scores in table.items():
        mean, half = interval(scores)
        print(f"  {name:24s} {mean:.4f} ± {half:.4f}  (n={len(scores)})")
    print("held-out valid-edit rate, greedy (95% CI), and why edits were rejected (share of turns):")
    for name, result in runs.items():
        for step in sorted(result["valid_rates"]):
            mean, half = interval(result["valid_rates"][step])
            why = ", ".join(f"{k} {v:.2f}" for k, v in result["rejections"][step].items() if v)
            label = f"{name}, {'before training' if step == 0 else f'step {step}'}"
            print(f"  {label:30s} {mean:.3f} ± {half:.3f}  ({why or 'none rejected'})")
    if searches:
        print(f"as the optimizer of `aflow optimize` ({args.search_rounds} rounds on {args.search_problems} "
              f"validation problems, seed 0; best workflows tested on the {len(ids)} held-out problems):")
        for name, found in searches.items():
            print(f"  {name:24s} held-out {found['test_score']}, validation {found['best_validation']}, "
                  f"valid edits {found['valid_edits']:.2f} (rejected: {', '.join(found['rejections']) or 'none'})")
    print(f"plot: {args.out / 'learning.png'}; everything in {args.out}; {time.monotonic() - started:.0f} s in all")
    (args.out / "table.json").write_text(json.dumps({k: interval(v) + (len(v),) for k, v in table.items()}, indent=1))
    (args.out / "searches.json").write_text(json.dumps(searches, indent=1))


if __name__ == "__main__":
    main()
