"""Seconds per GRPO step and peak memory of verl's RayPPOTrainer on CPU, and TRL's GRPOTrainer on the same job.

    python -m bench.grpo_step [--model embedded|DIR] [--prompts 2] [--n 4] [--completion-tokens 32]
                              [--steps 3] [--warmup 1] [--skip-trl]

Fixed sizes: `--prompts` rows (the operator-chain prompts of tests/toy_task.py, ~230 tokens each), `--n`
samples per row, every completion exactly `--completion-tokens` long (EOS ignored), one optimizer step per
training step over all prompts x n sequences in one micro-batch, no KL term, AdamW, temperature 1.
The reward (distinct words / completion tokens) only has to vary inside a group so the loss is not zero.

Each backend runs in its own subprocess, so its peak memory (model load included) is its own:

* verl: `python -m recipes.train preset=cpu-local` (verl's classic RayPPOTrainer.fit on the CPU through
  agent_system/verl_cpu: the `cpu` rollout serving all prompts x n requests as one batch, FSDP2 actor, GRPO,
  PPO clipped loss, weight sync after every update) with `FixedLengthLoop` as the agent loop (no AFlow
  environment, no executor); old log-probs recomputed by the actor (one no-grad forward), as verl does by
  default. Step seconds are verl's own `timing_s/step`; peak memory is the largest summed RSS of the whole
  process tree (driver, Ray, task runner, workers), sampled every 0.2 s.
* trl: `trl.GRPOTrainer` (transformers `generate`, `num_generations=n`, `beta=0`, `num_iterations=1`, no
  gradient checkpointing, `min_new_tokens` = `max_completion_length`), run by bench/trl_step.py in an
  interpreter of its own (`--trl-python`, default .venv-trl): trl cannot be installed beside verl 0.9.1
  (see that module).

The first `--warmup` steps are not timed. Output is one `name: value` per line; `ratio_verl_to_trl` > 1 means
verl's trainer is slower. Measured once before it was retired, the home-made local trainer on the same job:
see README ("Speed").
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from verl.experimental.agent_loop.agent_loop import AgentLoopBase, AgentLoopMetrics, AgentLoopOutput

from bench.trl_step import spread_reward
from tests.toy_task import TARGETS, generate_once, prompt_text


def rows(prompts: int) -> list[dict]:
    benchmarks = [list(TARGETS)[i % len(TARGETS)] for i in range(prompts)]
    return [{"prompt": [{"role": "user", "content": prompt_text(b)}], "benchmark": b} for b in benchmarks]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


class FixedLengthLoop(AgentLoopBase):
    """One generation of exactly `max_tokens` tokens per row (EOS ignored), rewarded by `spread_reward`."""

    async def run(self, sampling_params, **kwargs) -> AgentLoopOutput:
        tokens = self.rollout_config.response_length  # every completion exactly this long
        params = {**sampling_params, "ignore_eos": True, "max_tokens": tokens}
        prompt_ids, out = await generate_once(self, params, kwargs)
        text = self.tokenizer.decode(out.token_ids, skip_special_tokens=True)
        return AgentLoopOutput(prompt_ids=prompt_ids, response_ids=list(out.token_ids),
                               response_mask=[1] * len(out.token_ids), response_logprobs=out.log_probs,
                               reward_score=spread_reward(text, tokens), num_turns=2,
                               metrics=AgentLoopMetrics())


def model_dir(model: str) -> str:
    if model != "embedded":
        return model
    from agent_system.policy_model import load_policy, resolve_cache_dir

    if not (resolve_cache_dir() / "config.json").is_file():
        load_policy(None)  # converts the embedded SmolLM2 GGUF once
    return str(resolve_cache_dir())


def run_verl(args, work: Path) -> dict:
    import os
    import threading

    import pandas as pd
    import psutil

    from tests.verl_log import logger_env, step_metrics

    data = rows(args.prompts)
    pd.DataFrame({"data_source": ["bench"] * len(data), "prompt": [r["prompt"] for r in data],
                  "reward_model": [{"style": "rule", "ground_truth": ""}] * len(data),
                  "extra_info": [{"index": i} for i in range(len(data))],
                  "agent_name": ["fixed_length"] * len(data)}).to_parquet(work / "rows.parquet")
    (work / "agent_loop.yaml").write_text("- name: fixed_length\n  _target_: bench.grpo_step.FixedLengthLoop\n")
    batch = args.prompts * args.n
    overrides = [
        "preset=cpu-local", f"data.train_files={work / 'rows.parquet'}", f"data.val_files={work / 'rows.parquet'}",
        f"data.train_batch_size={args.prompts}", "data.shuffle=false", "data.max_prompt_length=320",
        f"data.max_response_length={args.completion_tokens}", "data.dataloader_num_workers=0",
        f"actor_rollout_ref.model.path={model_dir(args.model)}",
        f"actor_rollout_ref.rollout.agent.agent_loop_config_path={work / 'agent_loop.yaml'}",
        "actor_rollout_ref.rollout.agent.default_agent_loop=fixed_length", f"actor_rollout_ref.rollout.n={args.n}",
        "actor_rollout_ref.rollout.temperature=1.0", f"actor_rollout_ref.rollout.max_num_seqs={batch}",
        f"actor_rollout_ref.rollout.max_model_len={320 + args.completion_tokens}",
        f"actor_rollout_ref.rollout.max_num_batched_tokens={(320 + args.completion_tokens) * batch}",
        f"actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu={batch}",
        "algorithm.rollout_correction.bypass_mode=false", "actor_rollout_ref.actor.use_kl_loss=false",
        f"actor_rollout_ref.actor.ppo_mini_batch_size={args.prompts}",
        f"actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu={batch}", "actor_rollout_ref.actor.optim.lr=1e-6",
        "env.executor.base_url=http://127.0.0.1:9/v1", "env.executor.model=unused", "reward.num_workers=1",
        f"trainer.default_local_dir={work / 'ckpt'}", f"trainer.total_training_steps={args.warmup + args.steps}",
        "trainer.total_epochs=100000", "trainer.save_freq=-1", "trainer.val_before_train=false",
        "trainer.test_freq=-1", "trainer.resume_mode=disable", "trainer.logger=[console,file]"]
    env = {**os.environ, **logger_env(work / "metrics.jsonl"), "AFLOW_RUNS_DIR": str(work / "runs")}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen([sys.executable, "-m", "recipes.train", *overrides], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)
    peak = [0.0]

    def sample() -> None:  # the whole tree: driver, raylet, task runner, FSDP worker, rollout, agent loops
        root = psutil.Process(proc.pid)
        while proc.poll() is None:
            try:
                tree = [root, *root.children(recursive=True)]
                peak[0] = max(peak[0], sum(p.memory_info().rss for p in tree if p.is_running()) / 2**20)
            except psutil.Error:
                pass
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output = proc.communicate()[0]
    sampler.join()
    if proc.returncode != 0:
        raise RuntimeError(f"recipes.train exited {proc.returncode}: {output[-2000:]}")
    steps = step_metrics(work / "metrics.jsonl")
    timed = [steps[s] for s in sorted(steps) if s > args.warmup]
    # where a step's time goes, by verl's own timers (the rest: reward, advantage, bookkeeping)
    phases = {name: [m.get(f"timing_s/{name}", float("nan")) for m in timed]
              for name in ("gen", "old_log_prob", "update_actor", "update_weights")}
    return {"step_s": [m["timing_s/step"] for m in timed], "gen_s": phases.pop("gen"), "phases_s": phases,
            "completion_len": statistics.mean(m["response_length/mean"] for m in timed), "peak_rss_mb": peak[0]}


def child(args) -> None:
    with tempfile.TemporaryDirectory(prefix="grpo-bench-") as tmp:
        result = run_verl(args, Path(tmp))
    print("RESULT " + json.dumps(result), flush=True)


def spawn(backend: str, args) -> dict | str:
    if backend == "verl":
        argv = [sys.executable, "-m", "bench.grpo_step", "--run", "verl", "--model", args.model,
                "--prompts", str(args.prompts), "--n", str(args.n), "--completion-tokens", str(args.completion_tokens),
                "--steps", str(args.steps), "--warmup", str(args.warmup)]
        return _result(subprocess.run(argv, capture_output=True, text=True))
    job = {"model_dir": model_dir(args.model), "messages": [r["prompt"] for r in rows(args.prompts)],
           "prompts": args.prompts, "n": args.n, "completion_tokens": args.completion_tokens, "steps": args.steps,
           "warmup": args.warmup}
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as handle:
        json.dump(job, handle)
    root = Path(__file__).resolve().parent.parent
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(root)  # bench.trl_step alone: it imports nothing else of the project
    try:
        return _result(subprocess.run([args.trl_python, "-m", "bench.trl_step", handle.name], capture_output=True,
                                      text=True, cwd=root, env=env))
    finally:
        os.unlink(handle.name)


def _result(proc: subprocess.CompletedProcess) -> dict | str:
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return f"exit {proc.returncode}: {tail}"


def emit(name: str, value) -> None:
    if isinstance(value, float):
        value = f"{value:.3f}" if abs(value) < 100 else f"{value:.1f}"
    print(f"{name}: {value}", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded", help="'embedded' (SmolLM2-135M) or a local HF directory")
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--completion-tokens", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--skip-trl", action="store_true")
    parser.add_argument("--trl-python", default=str(Path(__file__).resolve().parent.parent / ".venv-trl/bin/python"),
                        help="an interpreter with trl (not this one: see bench/trl_step.py); default .venv-trl")
    parser.add_argument("--run", choices=["verl", "trl"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.run:
        return child(args)

    emit("sizes", f"{args.prompts} prompts x {args.n} samples x {args.completion_tokens} completion tokens, "
                  f"{args.steps} timed steps after {args.warmup} warm-up")
    results = {"verl": spawn("verl", args)}
    if args.skip_trl:
        results["trl"] = "skipped (--skip-trl)"
    else:
        if not Path(args.trl_python).is_file():
            results["trl"] = (f"no {args.trl_python}: python -m venv .venv-trl && "
                              ".venv-trl/bin/pip install torch==2.13.0 trl==1.16.0")
        else:
            results["trl"] = spawn("trl", args)
    for backend, result in results.items():
        if isinstance(result, str):
            emit(f"{backend}", f"did not run ({result})")
            continue
        emit(f"{backend}_step_s_median", statistics.median(result["step_s"]))
        emit(f"{backend}_step_s_all", " ".join(f"{s:.2f}" for s in result["step_s"]))
        if "gen_s" in result:
            emit(f"{backend}_generation_s_median", statistics.median(result["gen_s"]))
        for name, seconds in result.get("phases_s", {}).items():
            emit(f"{backend}_{name}_s_median", statistics.median(seconds))
        emit(f"{backend}_completion_tokens_mean", result["completion_len"])
        emit(f"{backend}_peak_rss_mb", result["peak_rss_mb"])
    if all(isinstance(r, dict) for r in results.values()):
        emit("ratio_verl_to_trl", statistics.median(results["verl"]["step_s"])
             / statistics.median(results["trl"]["step_s"]))


if __name__ == "__main__":
    main()
