"""A verifiable toy task built from the project's own pieces, small enough to learn in CI time.

"Design a workflow" reduced to its skeleton: the prompt shows AFlow's operator catalogue
(`aflow.operators.OPERATORS`) as a lettered menu and names a benchmark; the policy answers with
`CHAIN_LENGTH` letters (sampling restricted to the menu letters through the rollout's
`allowed_token_ids`, as vLLM would restrict it). The letters become a chained workflow
(`chain_graph`), which must pass the real static checks (`aflow.workflows.from_source`); the
reward is the Jaccard overlap between the operators it uses (`agent_system.reward.operators_used`)
and the benchmark's target set, 0 when the checks reject it.

A random-init model picks letters at random (expected reward about 0.2); a policy that learns
which operators each benchmark wants approaches 1. Used by the proof-of-learning test and by
bench/grpo_step.py.
"""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
from verl.experimental.agent_loop.agent_loop import AgentLoopBase, AgentLoopMetrics, AgentLoopOutput

from aflow.operators import OPERATOR_NAMES, OPERATORS
from aflow.workflows import WorkflowCheckError, from_source
from agent_system.reward import operators_used

LETTERS = [chr(ord("A") + i) for i in range(len(OPERATOR_NAMES))]
CHAIN_LENGTH = 4
TARGETS = {
    "gsm8k": ("AnswerGenerate", "Programmer"),
    "humaneval": ("CustomCodeGenerate", "Test"),
    "hotpotqa": ("AnswerGenerate", "ScEnsemble"),
    "math": ("Programmer", "Format"),
}
_ARGUMENT = re.compile(r"(\w+):")

# the proof-of-learning fit (tests/fits.py `toy_learning_runs`, tests/test_verl_learning.py)
AGENT = "toy_operator_chain"
STEPS = 20
BATCH = 4  # prompts per step (one per benchmark of TARGETS)
SAMPLES = 8  # rollouts per prompt (the GRPO group)
LR = 0.01


def prompt_text(benchmark: str) -> str:
    menu = "\n".join(f"{letter}) {name}: {OPERATORS[name].description}" for letter, name in zip(LETTERS, OPERATOR_NAMES,
                                                                                           strict=True))
    return (f"Operators:\n{menu}\n\nDesign a workflow for the benchmark below: reply with {CHAIN_LENGTH} "
            f"letters, the operators to call in order.\nBenchmark: {benchmark}")


def chain_graph(names: list[str]) -> str:
    """A native workflow calling `names` in order, each fed the previous step's text."""
    lines = [f"from aflow_ops import {', '.join(sorted(set(names)))}", "", "", "class Workflow:",
             "    async def __call__(self, problem):", "        text = problem"]
    for name in names:
        arguments = []
        for arg in _ARGUMENT.findall(OPERATORS[name].interface.split("->")[0]):
            value = {"problem": "problem", "input": "problem", "entry_point": "'solve'", "solutions": "[text]"}
            arguments.append(f"{arg}={value.get(arg, 'text')}")
        lines.append(f"        result = await {name}({', '.join(arguments)})")
        lines.append("        text = str(next(iter(result.values())))")
    lines.append("        return text")
    return "\n".join(lines) + "\n"


def chain_reward(letters: list[str], benchmark: str) -> float:
    names = [OPERATOR_NAMES[LETTERS.index(x)] for x in letters if x in LETTERS]
    if not names:
        return 0.0
    try:
        graph = from_source(chain_graph(names)).graph
    except WorkflowCheckError:
        return 0.0
    used, target = operators_used(graph), set(TARGETS[benchmark])
    return len(used & target) / len(used | target)


def write_parquet(path, repeat: int = 1) -> None:
    benchmarks = list(TARGETS) * repeat
    pd.DataFrame({
        "data_source": ["toy_operator_chain"] * len(benchmarks),
        "prompt": [[{"role": "user", "content": prompt_text(b)}] for b in benchmarks],
        "reward_model": [{"style": "rule", "ground_truth": ",".join(TARGETS[b])} for b in benchmarks],
        "extra_info": [{"index": i, "benchmark": b} for i, b in enumerate(benchmarks)],
    }).to_parquet(path)


def save_toy_tokenizer(path) -> int:
    """A word-level tokenizer of the toy prompts' own words with a ChatML template, saved as a Hugging Face
    tokenizer directory at `path`; returns its vocabulary size (a few dozen tokens).

    verl's FSDP engine computes log-probs over the whole vocabulary at every position of every sequence, so
    with SmolLM2's 49k-token vocabulary the update of 4 x 8 toy samples was ~5.7 s of a ~7 s step on 2 cores.
    The task needs only the menu letters, the operators' and benchmarks' names: the same task, the same
    letters, targets and reward, at a fraction of the cost. Words outside the vocabulary read as `<unk>`.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    special = ["<unk>", "<pad>", "<|im_start|>", "<|im_end|>"]
    words = ["system", "user", "assistant", *LETTERS, *OPERATOR_NAMES, *TARGETS, "=", ".", ":", ",",
             "letters", "for", *(str(d) for d in range(10))]
    vocab = {word: i for i, word in enumerate(dict.fromkeys(special + words))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.add_special_tokens(special)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", pad_token="<pad>",
                                        bos_token="<|im_start|>", eos_token="<|im_end|>")
    tokenizer.chat_template = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
                               "{{ message['content'] }}<|im_end|>\n{% endfor %}"
                               "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    tokenizer.save_pretrained(path)
    return len(tokenizer)


async def generate_once(loop: AgentLoopBase, sampling_params: dict, row: dict):
    """(prompt ids, TokenOutput): one generation for a dataset row's chat prompt through the loop's server."""
    prompt_ids = loop.tokenizer.apply_chat_template(row["raw_prompt"], add_generation_prompt=True, tokenize=True)
    if not isinstance(prompt_ids, list):
        prompt_ids = list(prompt_ids["input_ids"])
    out = await loop.server_manager.generate(request_id=row["uid"], prompt_ids=prompt_ids,
                                             sampling_params=sampling_params)
    return prompt_ids, out


class OperatorChainLoop(AgentLoopBase):
    """One restricted generation per row, scored by `chain_reward`."""

    async def run(self, sampling_params, **kwargs) -> AgentLoopOutput:
        letter_ids = [self.tokenizer.encode(f" {x}", add_special_tokens=False)[0] for x in LETTERS]
        params = {**sampling_params, "allowed_token_ids": letter_ids, "max_tokens": CHAIN_LENGTH, "ignore_eos": True}
        prompt_ids, out = await generate_once(self, params, kwargs)
        letters = [self.tokenizer.decode([t]).strip() for t in out.token_ids]
        reward = chain_reward(letters, kwargs["extra_info"]["benchmark"])
        return AgentLoopOutput(prompt_ids=prompt_ids, response_ids=list(out.token_ids),
                               response_mask=[1] * len(out.token_ids), response_logprobs=out.log_probs,
                               reward_score=reward, num_turns=2, metrics=AgentLoopMetrics(),
                               extra_fields={"letters": "".join(letters)})


def compact_prompt(benchmark: str) -> str:
    """The prompt with the operators' names only: the same task, letters, targets and reward
    (`chain_reward`), in a few dozen tokens of the toy vocabulary (`save_toy_tokenizer`)."""
    menu = " ".join(f"{letter}={name}" for letter, name in zip(LETTERS, OPERATOR_NAMES, strict=True))
    return f"{menu}. {CHAIN_LENGTH} letters for: {benchmark}"


def prepare_fit(out: Path) -> tuple[Path, Path, Path]:
    """(model dir, parquet, agent-loop YAML) of the proof-of-learning fit, written under `out`: a randomly
    initialised Llama (hidden 64, 2 layers) over the toy vocabulary, the toy parquet (every row names the
    toy agent loop) and the YAML that registers the loop with verl's AgentLoopWorker."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    model_dir = out / "tiny-llama"
    save_toy_tokenizer(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                                         max_position_embeddings=512, tie_word_embeddings=True,
                                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                         pad_token_id=tokenizer.pad_token_id))
    model.save_pretrained(model_dir)
    parquet = out / "toy.parquet"
    write_parquet(parquet)
    frame = pd.read_parquet(parquet)
    frame["prompt"] = [[{"role": "user", "content": compact_prompt(info["benchmark"])}] for info in frame["extra_info"]]
    frame["agent_name"] = AGENT
    frame.to_parquet(parquet)
    agent_loops = out / "agent_loop.yaml"
    agent_loops.write_text(f"- name: {AGENT}\n  _target_: tests.toy_task.OperatorChainLoop\n")
    return model_dir, parquet, agent_loops


def fit_overrides(model: Path, parquet: Path, agent_loops: Path, workdir: Path, lr: float, steps: int = STEPS,
                  batch: int = BATCH, samples: int = SAMPLES) -> list[str]:
    """`python -m recipes.train` overrides of the toy fit: preset cpu-local, one update per step over the
    whole batch, no environment, verl's file logger on (set $VERL_FILE_LOGGER_PATH)."""
    return [
        "preset=cpu-local", f"data.train_files={parquet}", f"data.val_files={parquet}",
        f"data.train_batch_size={batch}", "data.max_prompt_length=96", "data.max_response_length=4",
        "data.dataloader_num_workers=0",
        f"actor_rollout_ref.model.path={model}",
        f"actor_rollout_ref.rollout.agent.agent_loop_config_path={agent_loops}",
        f"actor_rollout_ref.rollout.agent.default_agent_loop={AGENT}",
        f"actor_rollout_ref.rollout.n={samples}",
        "actor_rollout_ref.rollout.max_model_len=100",
        f"actor_rollout_ref.rollout.max_num_batched_tokens={100 * batch * samples}",
        f"actor_rollout_ref.rollout.max_num_seqs={batch * samples}",
        f"actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu={batch * samples}",
        # old log-probs recomputed by the actor (verl's default): the toy loop restricts sampling to the menu
        # letters (allowed_token_ids), so the rollout's log-probs are of that restricted distribution, not the
        # actor's; as the PPO ratio's denominator they put half the tokens outside the clip range (measured
        # ppo_kl ~6, clipfrac ~0.56 with bypass_mode=true)
        "algorithm.rollout_correction.bypass_mode=false",
        f"actor_rollout_ref.actor.ppo_mini_batch_size={batch}",
        f"actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu={batch * samples}",
        f"actor_rollout_ref.actor.optim.lr={lr}", "actor_rollout_ref.actor.use_kl_loss=false",
        "algorithm.adv_estimator=grpo", "reward.num_workers=1",
        # the toy loop needs no environment: a URL here keeps the task runner from starting the executor
        "env.executor.base_url=http://127.0.0.1:9/v1", "env.executor.model=unused",
        f"trainer.default_local_dir={workdir / 'ckpt'}", f"trainer.total_training_steps={steps}",
        "trainer.total_epochs=100000", "trainer.resume_mode=disable", "trainer.val_before_train=false",
        "trainer.test_freq=-1", "trainer.save_freq=-1", "trainer.logger=[console,file]",
    ]
