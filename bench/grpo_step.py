"""Seconds per GRPO step and peak memory of the local trainer on CPU, and TRL's GRPOTrainer on the same job.

    python -m bench.grpo_step [--model embedded|DIR] [--prompts 2] [--n 4] [--completion-tokens 32]
                              [--steps 3] [--warmup 1] [--skip-trl]

Fixed sizes: `--prompts` rows (the operator-chain prompts of tests/toy_task.py, ~230 tokens each), `--n`
samples per row, every completion exactly `--completion-tokens` long (EOS ignored), one optimizer step per
training step over all prompts x n sequences in one micro-batch, no KL term, AdamW, temperature 1.
The reward (distinct words / completion tokens) only has to vary inside a group so the loss is not zero.

Each backend runs in its own subprocess, so its peak RSS (`ru_maxrss`, model load included) is its own:

* local: `recipes.local_trainer.LocalTrainer.train_step` (the CPU generation backend serving verl's
  `server_manager.generate`, all prompts x n requests decoded as one batch (`max_num_seqs`), an agent loop,
  verl's GRPO advantage and clipped policy loss), with no Ray and no executor (`local_trainer.environment=false`);
  it also recomputes old log-probs (one no-grad forward), as verl's actor does.
* trl: `trl.GRPOTrainer` (transformers `generate`, `num_generations=n`, `beta=0`, `num_iterations=1`, no
  gradient checkpointing, `min_new_tokens` = `max_completion_length`). Needs `pip install -e .[bench]`.

The first `--warmup` steps are not timed. Output is one `name: value` per line; `ratio_local_to_trl` > 1 means
the local trainer is slower.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from verl.experimental.agent_loop.agent_loop import AgentLoopBase, AgentLoopMetrics, AgentLoopOutput

from tests.toy_task import TARGETS, generate_once, prompt_text


def spread_reward(text: str, completion_tokens: int) -> float:
    return len(set(text.split())) / completion_tokens


def rows(prompts: int) -> list[dict]:
    benchmarks = [list(TARGETS)[i % len(TARGETS)] for i in range(prompts)]
    return [{"prompt": [{"role": "user", "content": prompt_text(b)}], "benchmark": b} for b in benchmarks]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


class FixedLengthLoop(AgentLoopBase):
    """One generation of exactly `max_tokens` tokens per row (EOS ignored), rewarded by `spread_reward`."""

    async def run(self, sampling_params, **kwargs) -> AgentLoopOutput:
        params = {**sampling_params, "ignore_eos": True}
        prompt_ids, out = await generate_once(self, params, kwargs)
        text = self.tokenizer.decode(out.token_ids, skip_special_tokens=True)
        return AgentLoopOutput(prompt_ids=prompt_ids, response_ids=list(out.token_ids),
                               response_mask=[1] * len(out.token_ids), response_logprobs=out.log_probs,
                               reward_score=spread_reward(text, params["max_tokens"]), num_turns=2,
                               metrics=AgentLoopMetrics())


def model_dir(model: str) -> str:
    if model != "embedded":
        return model
    from agent_system.policy_model import load_policy, resolve_cache_dir

    if not (resolve_cache_dir() / "config.json").is_file():
        load_policy(None)  # converts the embedded SmolLM2 GGUF once
    return str(resolve_cache_dir())


def run_local(args, work: Path) -> dict:
    import pandas as pd
    from omegaconf import OmegaConf

    from recipes.config import compose, register_resolvers
    from recipes.local_trainer import LocalTrainer

    data = rows(args.prompts)
    pd.DataFrame({"data_source": ["bench"] * len(data), "prompt": [r["prompt"] for r in data],
                  "reward_model": [{"style": "rule", "ground_truth": ""}] * len(data),
                  "extra_info": [{"index": i} for i in range(len(data))]}).to_parquet(work / "rows.parquet")
    batch = args.prompts * args.n
    register_resolvers()
    config = compose([
        "preset=cpu-smoke", "trainer.backend=local", f"data.train_files={work / 'rows.parquet'}",
        f"data.train_batch_size={args.prompts}", "data.shuffle=false", f"actor_rollout_ref.rollout.n={args.n}",
        f"actor_rollout_ref.model.path={model_dir(args.model)}", "actor_rollout_ref.actor.use_kl_loss=false",
        f"actor_rollout_ref.actor.ppo_mini_batch_size={args.prompts}",
        f"actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu={batch}", "actor_rollout_ref.rollout.temperature=1.0",
        f"actor_rollout_ref.rollout.max_num_seqs={batch}",
        f"local_trainer.max_tokens={args.completion_tokens}", "local_trainer.lr=1e-6",
        "local_trainer.environment=false", "local_trainer.agent_loop=bench.grpo_step.FixedLengthLoop",
        f"trainer.default_local_dir={work / 'ckpt'}", "trainer.resume_mode=disable"])
    OmegaConf.resolve(config)
    trainer = LocalTrainer(config)
    batches = trainer.batches(trainer.load_rows())
    steps, gens, lengths = [], [], []
    for i in range(args.warmup + args.steps):
        metrics = trainer.train_step(next(batches))
        if i >= args.warmup:
            steps.append(metrics["timing_s/step"])
            gens.append(metrics["timing_s/gen"])
            lengths.append(metrics["response_length/mean"])
    return {"step_s": steps, "gen_s": gens, "completion_len": statistics.mean(lengths), "peak_rss_mb": peak_rss_mb()}


def run_trl(args, work: Path) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    path = model_dir(args.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    batch = args.prompts * args.n
    dataset = Dataset.from_list([{"prompt": r["prompt"]} for r in rows(args.prompts)])

    def reward(completions, **_):
        return [spread_reward(c[-1]["content"] if isinstance(c, list) else c, args.completion_tokens)
                for c in completions]

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.started, self.times = 0.0, []

        def on_step_begin(self, *_, **__):
            self.started = time.monotonic()

        def on_step_end(self, *_, **__):
            self.times.append(time.monotonic() - self.started)

    config = GRPOConfig(
        output_dir=str(work / "trl"), use_cpu=True, bf16=False, fp16=False, report_to="none", save_strategy="no",
        logging_steps=1, max_steps=args.warmup + args.steps, learning_rate=1e-6, seed=0,
        per_device_train_batch_size=batch, gradient_accumulation_steps=1, num_generations=args.n,
        steps_per_generation=1, num_iterations=1, beta=0.0, temperature=1.0, gradient_checkpointing=False,
        max_completion_length=args.completion_tokens,
        generation_kwargs={"min_new_tokens": args.completion_tokens}, dataloader_num_workers=0)
    timer = StepTimer()
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=config, train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[timer])
    trainer.train()
    lengths = [h["completions/mean_length"] for h in trainer.state.log_history if "completions/mean_length" in h]
    return {"step_s": timer.times[args.warmup:], "completion_len": statistics.mean(lengths) if lengths else None,
            "peak_rss_mb": peak_rss_mb()}


def child(args) -> None:
    with tempfile.TemporaryDirectory(prefix="grpo-bench-") as tmp:
        result = (run_local if args.run == "local" else run_trl)(args, Path(tmp))
    print("RESULT " + json.dumps(result), flush=True)


def spawn(backend: str, args) -> dict | str:
    argv = [sys.executable, "-m", "bench.grpo_step", "--run", backend, "--model", args.model,
            "--prompts", str(args.prompts), "--n", str(args.n), "--completion-tokens", str(args.completion_tokens),
            "--steps", str(args.steps), "--warmup", str(args.warmup)]
    proc = subprocess.run(argv, capture_output=True, text=True)
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
    parser.add_argument("--run", choices=["local", "trl"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.run:
        return child(args)

    emit("sizes", f"{args.prompts} prompts x {args.n} samples x {args.completion_tokens} completion tokens, "
                  f"{args.steps} timed steps after {args.warmup} warm-up")
    results = {"local": spawn("local", args)}
    if args.skip_trl:
        results["trl"] = "skipped (--skip-trl)"
    else:
        try:
            import trl  # noqa: F401
        except ImportError:
            results["trl"] = "not installed: pip install -e .[bench]"
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
        emit(f"{backend}_completion_tokens_mean", result["completion_len"])
        emit(f"{backend}_peak_rss_mb", result["peak_rss_mb"])
    if all(isinstance(r, dict) for r in results.values()):
        emit("ratio_local_to_trl", statistics.median(results["local"]["step_s"])
             / statistics.median(results["trl"]["step_s"]))


if __name__ == "__main__":
    main()
