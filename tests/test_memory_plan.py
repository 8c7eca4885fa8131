"""The memory planner (recipes/memory_plan.py): its model counts match real models exactly, it
refuses the 80 GB preset as it was (verl moves fp32 params + grads + Adam onto the GPU for the
update), today's presets fit their GPU with the margin, and the GPU extra pins what verl pins."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

pytest.importorskip("verl")
from recipes.config import compose  # noqa: E402
from recipes.memory_plan import KNOWN_MODELS, QWEN25_7B, SMOLLM2_135M, memory_plan  # noqa: E402
from recipes.preflight import plan_for  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BIG_CLUSTER = {"source": "test", "cpus": 64, "gpus": 1, "node_gpus": [1]}
# the 80 GB preset before the planner: verl's param/optimizer offload (between phases only), FSDP1,
# a fp32 reference, four 8k-token sequences per log-prob micro-batch
OLD_80G = ["preset=qwen2.5-7b-a100-80g", "actor_rollout_ref.actor.strategy=fsdp",
           "actor_rollout_ref.actor.fsdp_config.offload_policy=false",
           "actor_rollout_ref.actor.fsdp_config.param_offload=true",
           "actor_rollout_ref.actor.fsdp_config.optimizer_offload=true",
           "actor_rollout_ref.ref.fsdp_config.model_dtype=fp32", "actor_rollout_ref.rollout.gpu_memory_utilization=0.6"]


def _meta_params(config) -> int:
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def test_parameter_counts_match_the_real_architectures():
    from transformers import LlamaConfig, Qwen2Config

    s = QWEN25_7B
    qwen = Qwen2Config(vocab_size=s.vocab, hidden_size=s.hidden, num_hidden_layers=s.layers,
                       intermediate_size=s.intermediate, num_attention_heads=s.heads, num_key_value_heads=s.kv_heads,
                       tie_word_embeddings=s.tied)
    assert QWEN25_7B.params == _meta_params(qwen) == 7_615_616_512  # Qwen2.5-7B's published 7.61B
    s = SMOLLM2_135M
    smol = LlamaConfig(vocab_size=s.vocab, hidden_size=s.hidden, num_hidden_layers=s.layers,
                       intermediate_size=s.intermediate, num_attention_heads=s.heads, num_key_value_heads=s.kv_heads,
                       tie_word_embeddings=s.tied)
    assert SMOLLM2_135M.params == _meta_params(smol)
    assert KNOWN_MODELS["embedded"] is SMOLLM2_135M


def test_the_old_80g_preset_is_refused_for_the_update():
    plan = plan_for(compose(OLD_80G), BIG_CLUSTER)
    assert not plan["fits"]
    update = plan["memory"]["phases_gb"]["update"]
    # fp32 weights + grads + Adam: 16 bytes per parameter on the GPU
    assert update["actor weights"] + update["gradients"] + update["Adam states"] == pytest.approx(
        16 * QWEN25_7B.params / 1024**3, rel=1e-3)
    assert plan["message"].startswith("memory: the update phase needs")
    assert "offload_policy=true" in plan["message"] and "strategy=fsdp2" in plan["message"]


def test_the_old_40g_lora_preset_is_refused_and_told_to_use_bf16():
    plan = plan_for(compose(["preset=qwen2.5-7b-a100-40g-lora", "actor_rollout_ref.actor.fsdp_config.model_dtype=fp32",
                             "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=2"]), BIG_CLUSTER)
    assert not plan["fits"]
    assert "model_dtype=bf16" in plan["message"]


@pytest.mark.parametrize("preset,gpu_gb", [("qwen2.5-7b-a100-80g", 80), ("qwen2.5-7b-a100-40g-lora", 40)])
def test_todays_gpu_presets_fit_their_gpu_with_the_margin(preset, gpu_gb):
    config = compose([f"preset={preset}"])
    plan = plan_for(config, BIG_CLUSTER)
    assert plan["fits"], plan["message"]
    memory = plan["memory"]
    assert memory["gpu_gb"] == gpu_gb  # the preset's declared GPU, since none is measured here
    assert max(p["total"] for p in memory["phases_gb"].values()) <= gpu_gb * 0.9
    # and every sequence of a step fits vLLM's KV cache at once
    episodes = config.data.train_batch_size * config.actor_rollout_ref.rollout.n
    assert memory["kv_cache"]["full_length_sequences"] >= min(episodes, config.actor_rollout_ref.rollout.max_num_seqs)
    # the README prints these numbers
    readme = (ROOT / "README.md").read_text()
    for phase in ("rollout", "update"):
        assert f"{memory['phases_gb'][phase]['total']:g}" in readme, (preset, phase)


def test_a_measured_gpu_wins_over_the_declared_one():
    plan = plan_for(compose(["preset=qwen2.5-7b-a100-80g"]), {**BIG_CLUSTER, "gpu_memory_gb": 24})
    assert not plan["fits"] and "more than 24 GiB" in plan["message"]


def test_host_memory_is_checked_when_known():
    plan = plan_for(compose(["preset=qwen2.5-7b-a100-80g", "preflight.host_memory_gb=128"]), BIG_CLUSTER)
    assert not plan["fits"] and "host RAM" in plan["message"]


def test_preflight_cli_refuses_the_old_preset_in_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "recipes.preflight", "--cluster-cpus", "64", "--cluster-gpus", "1",
                             *OLD_80G], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 3, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1].startswith("preflight: memory: the update phase needs")


def test_unknown_model_has_no_estimate_and_is_not_refused():
    config = compose(["preset=qwen2.5-7b-a100-80g", "actor_rollout_ref.model.path=/nowhere/model"])
    assert memory_plan(config, 80)["fits"]


def test_the_gpu_extra_pins_verl_and_vllm_as_verl_does():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert "verl[vllm]==0.9.1" in extras["gpu"]
    assert not any(r.split("[")[0].split("=")[0].strip() == "vllm" for r in extras["gpu"])  # no unpinned vllm
    pins = [r for r in importlib.metadata.requires("verl") if 'extra == "vllm"' in r]
    assert any(r.startswith("vllm==") for r in pins) and any(r.startswith("torch==") for r in pins)
