"""TRL's GRPOTrainer on the job of bench/grpo_step.py, in an interpreter of its own.

    <trl-python> -m bench.trl_step JOB.json      # prints one `RESULT {json}` line

Why a separate interpreter: trl and verl 0.9.1 cannot share an environment. verl's FSDP engine imports
trl's `AutoModelForCausalLMWithValueHead` whenever trl is importable: trl 1.x no longer has it (the actor
fails at model init), and verl's own pin, trl 0.27.0, fails against the transformers verl 0.9.1 runs with
(its `is_weave_available()` takes transformers' new (found, version) tuple for True). So this module
imports nothing of the project: the job (prompts, sizes, model directory) comes as JSON from grpo_step.

Set up once:  python -m venv .venv-trl && .venv-trl/bin/pip install torch==2.13.0 trl==1.16.0
"""

from __future__ import annotations

import json
import resource
import statistics
import sys
import tempfile
import time


def spread_reward(text: str, completion_tokens: int) -> float:
    """Distinct words per completion token: it only has to vary inside a group so the loss is not zero."""
    return len(set(text.split())) / completion_tokens


def run(job: dict) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(job["model_dir"])
    model = AutoModelForCausalLM.from_pretrained(job["model_dir"])
    batch, tokens = job["prompts"] * job["n"], job["completion_tokens"]
    dataset = Dataset.from_list([{"prompt": prompt} for prompt in job["messages"]])

    def reward(completions, **_):
        return [spread_reward(c[-1]["content"] if isinstance(c, list) else c, tokens) for c in completions]

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.started, self.times = 0.0, []

        def on_step_begin(self, *_, **__):
            self.started = time.monotonic()

        def on_step_end(self, *_, **__):
            self.times.append(time.monotonic() - self.started)

    with tempfile.TemporaryDirectory(prefix="trl-bench-") as tmp:
        config = GRPOConfig(
            output_dir=tmp, use_cpu=True, bf16=False, fp16=False, report_to="none", save_strategy="no",
            logging_steps=1, max_steps=job["warmup"] + job["steps"], learning_rate=1e-6, seed=0,
            per_device_train_batch_size=batch, gradient_accumulation_steps=1, num_generations=job["n"],
            steps_per_generation=1, num_iterations=1, beta=0.0, temperature=1.0, gradient_checkpointing=False,
            max_completion_length=tokens, generation_kwargs={"min_new_tokens": tokens}, dataloader_num_workers=0)
        timer = StepTimer()
        trainer = GRPOTrainer(model=model, reward_funcs=reward, args=config, train_dataset=dataset,
                              processing_class=tokenizer, callbacks=[timer])
        trainer.train()
    lengths = [h["completions/mean_length"] for h in trainer.state.log_history if "completions/mean_length" in h]
    return {"step_s": timer.times[job["warmup"]:], "completion_len": statistics.mean(lengths) if lengths else None,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


if __name__ == "__main__":
    with open(sys.argv[1]) as handle:
        print("RESULT " + json.dumps(run(json.load(handle))), flush=True)
