"""A trained policy as a product (agent_system.policy, `aflow policy export|serve`, `aflow optimize
--optimizer-policy`): checkpoints refused with one line, LoRA folded into the base, and the main job's
checkpoint (the session's shared fit) exported, served and used as the optimizer of a search."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from agent_system.policy import checkpoint as ckpt_mod
from agent_system.policy.checkpoint import CheckpointError, export, find_checkpoint
from tests.fits import free_port

AFLOW = str(Path(sys.executable).with_name("aflow"))


def _actor(root: Path, world_size: int = 1, ranks=(0,), hf: bool = True, state: dict | None = None) -> Path:
    actor = root / "global_step_3" / "actor"
    actor.mkdir(parents=True)
    (actor / "fsdp_config.json").write_text(json.dumps({"FSDP_version": 1, "world_size": world_size}))
    for rank in ranks:
        torch.save(state if state is not None else {"w": torch.zeros(1)},
                   actor / f"model_world_size_{world_size}_rank_{rank}.pt")
    if hf:
        (actor / "huggingface").mkdir()
        (actor / "huggingface" / "config.json").write_text("{}")
    (root / "latest_checkpointed_iteration.txt").write_text("3")
    return actor


def test_a_checkpoint_is_found_from_the_run_directory_its_step_or_its_actor(tmp_path):
    actor = _actor(tmp_path)
    for path in (tmp_path, actor.parent, actor):
        found = find_checkpoint(path)
        assert (found.actor_dir, found.step, found.world_size) == (actor, 3, 1)


@pytest.mark.parametrize("case, message", [
    ("not a checkpoint", "is not a verl checkpoint"),
    ("missing", "does not exist"),
    ("no fsdp config", "no fsdp_config.json"),
    ("missing shard", "rank(s) 1 of 2 are missing"),
    ("no hf config", "no huggingface/config.json"),
    ("dangling latest", "names step 3, but"),
])
def test_what_is_not_a_complete_checkpoint_is_one_line_naming_what_is_missing(tmp_path, case, message):
    path = tmp_path / "run"
    path.mkdir()
    if case == "missing":
        path = tmp_path / "nowhere"
    elif case == "no fsdp config":
        (_actor(path) / "fsdp_config.json").unlink()
    elif case == "missing shard":
        _actor(path, world_size=2, ranks=(0,))
    elif case == "no hf config":
        _actor(path, hf=False)
    elif case == "dangling latest":
        (path / "latest_checkpointed_iteration.txt").write_text("3")
    with pytest.raises(CheckpointError, match=re.escape(message)):
        find_checkpoint(path)
    out = subprocess.run([AFLOW, "policy", "export", str(path), "--out", str(tmp_path / "out")],
                         capture_output=True, text=True)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and message in out.stderr, out.stderr
    assert not (tmp_path / "out").exists()


def test_a_lora_only_checkpoint_without_its_base_model_is_refused(tmp_path):
    _actor(tmp_path, state={"base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight": torch.ones(2, 4)})
    with pytest.raises(CheckpointError, match="holds only LoRA weights and the base model .* is missing"):
        export(tmp_path, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial-*"))


def _tiny_llama(directory: Path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(directory)
    return model


def test_lora_is_folded_into_the_base_weights(tmp_path):
    """verl's merger writes a LoRA run as base weights plus lora_adapter/; the export is one model whose
    outputs are the adapted model's."""
    from peft import LoraConfig, get_peft_model
    from tokenizers import Tokenizer, models
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    base = _tiny_llama(tmp_path / "base")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, "[UNK]")))
    tokenizer.save_pretrained(tmp_path / "base")
    adapted = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, param in adapted.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)  # peft starts B at 0: a no-op adapter would prove nothing
    adapted.save_pretrained(tmp_path / "adapter")
    ids = torch.tensor([[1, 5, 9, 13, 2]])
    with torch.no_grad():
        expected = adapted(input_ids=ids).logits.float()
        base_only = adapted.get_base_model()
        with adapted.disable_adapter():
            unadapted = base_only(input_ids=ids).logits.float()
    ckpt_mod._fold_lora(tmp_path / "base", tmp_path / "adapter", tmp_path / "folded", tmp_path / "base")
    folded = AutoModelForCausalLM.from_pretrained(tmp_path / "folded", dtype=torch.bfloat16)
    with torch.no_grad():
        got = folded(input_ids=ids).logits.float()
    assert not torch.allclose(unadapted, expected, atol=1e-2)  # the adapter matters
    assert torch.allclose(got, expected, atol=3e-2), (got - expected).abs().max()
    assert not any("lora" in k for k in folded.state_dict())


# ---- the main job's checkpoint (tests/fits.py main_job_run) ----

@pytest.fixture(scope="module")
def exported(main_job_run, tmp_path_factory) -> Path:
    main_job_run.first.check()
    out = tmp_path_factory.mktemp("policy") / "model"
    done = subprocess.run([AFLOW, "policy", "export", str(main_job_run.checkpoint_dir), "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def test_the_main_jobs_checkpoint_exports_to_a_model_with_its_trained_weights(main_job_run, exported):
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from agent_system.policy_model import ensure_default_converted

    record = json.loads((exported / "aflow_policy.json").read_text())
    step_dir = main_job_run.checkpoint_dir / "global_step_2"
    assert record["checkpoint"] == str(step_dir) and record["step"] == 2 and record["lora"] == "none"
    assert record["run"]["action_space"] == "canvas" and record["run"]["benchmarks"] == ["humaneval"]
    assert AutoTokenizer.from_pretrained(exported).chat_template  # the chat template travels with it
    weights = load_file(exported / "model.safetensors")
    trained = torch.load(step_dir / "actor" / "model_world_size_1_rank_0.pt", map_location="cpu", weights_only=False)
    initial = load_file(next(ensure_default_converted().glob("*.safetensors")))
    name = "model.layers.0.self_attn.q_proj.weight"
    local = trained[name].to_local() if hasattr(trained[name], "to_local") else trained[name]
    assert torch.equal(weights[name].float(), local.to(weights[name].dtype).float())  # the trained weights
    assert not torch.equal(weights[name].float(), initial[name].to(weights[name].dtype).float())  # not the base


def test_the_served_policy_answers_canvas_edits_over_an_openai_api(exported, tmp_path):
    import openai
    from openai import OpenAI

    from aflow.canvas import Action, initial, parse
    from aflow.search.prompts import canvas_optimizer_prompt

    port = free_port()
    server = subprocess.Popen([AFLOW, "policy", "serve", str(exported), "--port", str(port), "--action-space",
                               "canvas", "--benchmark", "humaneval"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, start_new_session=True)
    try:
        base_url = server.stdout.readline().strip()
        assert base_url == f"http://127.0.0.1:{port}/v1", server.stderr.read()[-2000:] if server.poll() else base_url
        client = OpenAI(base_url=base_url, api_key="none")
        assert [m.id for m in client.models.list().data] == ["aflow-policy-step2", "aflow-policy-step2:text"]
        prompt = canvas_optimizer_prompt("humaneval", initial(code=True), 0.5, [], [])
        for seed in range(3):
            reply = client.chat.completions.create(model="aflow-policy-step2", temperature=1.0, seed=seed,
                                                   max_tokens=64, messages=[{"role": "user", "content": prompt}])
            text = reply.choices[0].message.content
            assert isinstance(parse(text.strip()), Action), text  # every answer is one canvas edit: training's grammar
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model="other", messages=[{"role": "user", "content": "hi"}])
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        assert server.wait(30) == 0


def test_the_command_the_main_job_prints_searches_with_its_policy(main_job_run, exported, tmp_path):
    printed = re.search(r"search with the trained policy: (.+)", main_job_run.first.output)
    assert printed, main_job_run.first.output[-3000:]
    command = shlex.split(printed.group(1))
    assert command[:2] == ["aflow", "optimize"] and str(main_job_run.checkpoint_dir / "global_step_2") in command
    workspace = tmp_path / "search"
    env = {k: v for k, v in os.environ.items() if k != "AFLOW_DATA_DIR"}  # as on a fresh machine
    done = subprocess.run([AFLOW, *command[1:], "--workspace", str(workspace), "--rounds", "2", "--limit", "3",
                           "--validation-rounds", "1", "--value-provider", "model", "--value-weight", "0.5"],
                          capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    config = json.loads((workspace / "config.json").read_text())
    assert config["optimizer_policy"]["checkpoint"] == str(main_job_run.checkpoint_dir / "global_step_2")
    assert config["optimizer_policy"]["backend"] == "cpu" and config["optimizer_policy"]["grammar"] == "canvas-code"
    expansions = [json.loads(line) for line in (workspace / "expansions.jsonl").read_text().splitlines()]
    assert expansions and all(e["optimizer"] == "aflow-policy-step2" for e in expansions)
    results = json.loads((workspace / "results.json").read_text())
    assert (workspace / "round_1" / "scores.json").is_file() and (workspace / "round_2" / "scores.json").is_file()
    assert results, results
    assert "optimizer policy:" in done.stderr and "served by the cpu backend" in done.stderr

