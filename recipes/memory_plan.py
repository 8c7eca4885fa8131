"""GPU and host memory of a verl 0.9.1 GRPO job, per device and by phase, from the composed config.

A pure function of the config (no verl, no GPU): `memory_plan(config, gpu_gb, host_gb)`. It exists
because verl's offload flags do not mean what their names suggest: `param_offload` and
`optimizer_offload` move actor state to the host only *between* phases; for the update verl loads
fp32 params + grads + Adam onto the GPU (`workers/engine/base.py` context switch, the FSDP engine's
update path) — 16 bytes per parameter, ~122 GB for Qwen2.5-7B, which no 80 GB GPU holds. Only
FSDP2's CPU offload policy (`fsdp_config.offload_policy: true`, strategy fsdp2) keeps the state on
the host and runs Adam there, streaming one layer's weights to the GPU at a time.

The model, per GPU (world size W = trainer.n_gpus_per_node x trainer.nnodes; FSDP shards actor state
over W; the rollout runs one vLLM replica per tensor-parallel group of size TP):
- actor weights P*d/W, grads T*d/W, Adam 2*T*d/W; d = bytes of fsdp_config.model_dtype (fp32: 4),
  T = trainable parameters (P, or the LoRA adapter's).
- activations of a micro-batch of n sequences of S = max_prompt_length + max_response_length tokens:
  with gradient checkpointing L*n*S*h*2 bytes of layer inputs plus one layer's full activations,
  n*S*2*(9h + 2I) bytes (34*h per token for I = 4h, as in Korthikanti et al. with memory-efficient
  attention); without it, all L layers' full activations.
- logits: n*S*V*4 bytes (verl upcasts to fp32) x 2 in forward-only phases (logits, log-softmax),
  x 3 in the update (plus their gradient).
- vLLM (rollout): gpu_memory_utilization x GPU is reserved; in it the bf16 weights 2P/TP, ~2 GB of
  activations and CUDA graphs, and the KV cache, 2*L*kv_heads*head_dim*2 bytes per token.
- a layer streamed by an offload policy: two layers' bf16 weights (one in use, one prefetched).
Phases: rollout (vLLM awake, actor state that is not offloaded stays), old_log_prob (actor forward),
ref_log_prob (the reference: forward-only, so verl 0.9.1 gives it a CPU offload policy; absent with
LoRA, where the actor with the adapter disabled is the reference), update (actor forward+backward+
Adam). Host, per node: everything offloaded, the reference's weights, vLLM's sleeping weights, the
full state dict each rank builds at start-up (FSDP2 loading), and 16 GB for Ray, Python and the
environment workers.

A plan fits when every phase stays within (1 - margin) of the GPU (margin 10% by default: CUDA
context, allocator fragmentation, NCCL buffers) and the host total within the host's RAM when it is
known. Estimates, not measurements: they are meant to refuse what cannot fit, with the knob to turn.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

GIB = 1024**3
DTYPE_BYTES = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2}
HOST_BASE_GB = 16.0  # Ray, the driver and workers' Python, environment workers, datasets
VLLM_OVERHEAD_GB = 2.0  # vLLM's activations for max_num_batched_tokens and CUDA graphs
DEFAULT_MARGIN = 0.10


@dataclass(frozen=True)
class ModelShape:
    vocab: int
    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool
    qkv_bias: bool = False  # Qwen2 has biases on q, k and v; Llama none

    @property
    def layer_params(self) -> int:
        h, kv = self.hidden, self.kv_heads * self.head_dim
        attention = h * self.heads * self.head_dim * 2 + h * kv * 2
        if self.qkv_bias:
            attention += kv * 2 + self.heads * self.head_dim
        return attention + 3 * h * self.intermediate + 2 * h

    @property
    def params(self) -> int:
        embeddings = self.vocab * self.hidden * (1 if self.tied else 2)
        return self.layers * self.layer_params + embeddings + self.hidden

    def lora_params(self, rank: int, targets: list[str]) -> int:
        h, kv, inner = self.hidden, self.kv_heads * self.head_dim, self.heads * self.head_dim
        shapes = {"q_proj": (h, inner), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (inner, h),
                  "gate_proj": (h, self.intermediate), "up_proj": (h, self.intermediate),
                  "down_proj": (self.intermediate, h)}
        if targets in (["all-linear"], "all-linear"):
            targets = list(shapes)
        return self.layers * sum(rank * (shapes[t][0] + shapes[t][1]) for t in targets if t in shapes)

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * 2  # K and V, bf16


QWEN25_7B = ModelShape(vocab=152064, hidden=3584, layers=28, intermediate=18944, heads=28, kv_heads=4,
                       head_dim=128, tied=False, qkv_bias=True)
SMOLLM2_135M = ModelShape(vocab=49152, hidden=576, layers=30, intermediate=1536, heads=9, kv_heads=3,
                          head_dim=64, tied=True)
KNOWN_MODELS = {"Qwen/Qwen2.5-7B-Instruct": QWEN25_7B, "Qwen/Qwen2.5-7B": QWEN25_7B, "embedded": SMOLLM2_135M,
                "HuggingFaceTB/SmolLM2-135M-Instruct": SMOLLM2_135M}


def model_shape(path: str) -> ModelShape | None:
    """A known model by name, else a local directory's config.json (nothing is downloaded)."""
    if path in KNOWN_MODELS:
        return KNOWN_MODELS[path]
    config = Path(path).expanduser() / "config.json"
    if not config.is_file():
        return None
    c = json.loads(config.read_text())
    heads = int(c["num_attention_heads"])
    return ModelShape(vocab=int(c["vocab_size"]), hidden=int(c["hidden_size"]), layers=int(c["num_hidden_layers"]),
                      intermediate=int(c["intermediate_size"]), heads=heads,
                      kv_heads=int(c.get("num_key_value_heads") or heads),
                      head_dim=int(c.get("head_dim") or int(c["hidden_size"]) // heads),
                      tied=bool(c.get("tie_word_embeddings", False)),
                      qkv_bias=bool(c.get("attention_bias", c.get("model_type") == "qwen2")))


def _gb(value: float) -> float:
    return round(value / GIB, 2)


def _g(node: Any, dotted: str, default: Any = None) -> Any:
    for key in dotted.split("."):
        if node is None:
            return default
        node = node.get(key) if hasattr(node, "get") else None
    return default if node is None else node


def memory_plan(config: Any, gpu_gb: float | None, host_gb: float | None = None,
                margin: float = DEFAULT_MARGIN) -> dict[str, Any]:
    """Per-GPU bytes by phase and host bytes per node for the composed config; `fits` and a one-line
    `message` naming what to change when it does not. `gpu_gb` None: nothing to check on a GPU."""
    shape = model_shape(str(_g(config, "actor_rollout_ref.model.path", "")))
    if shape is None:
        return {"model": str(_g(config, "actor_rollout_ref.model.path")), "fits": True,
                "message": None, "note": "unknown model shape: no memory estimate (add it to KNOWN_MODELS)"}
    arr = config["actor_rollout_ref"]
    actor_fsdp = _g(arr, "actor.fsdp_config", {})
    gpus_per_node = int(_g(config, "trainer.n_gpus_per_node", 1))
    world = gpus_per_node * int(_g(config, "trainer.nnodes", 1))
    tp = int(_g(arr, "rollout.tensor_model_parallel_size", 1))
    d = DTYPE_BYTES[str(_g(actor_fsdp, "model_dtype", "fp32"))]
    ref_d = DTYPE_BYTES[str(_g(arr, "ref.fsdp_config.model_dtype", "fp32"))]
    lora_rank = int(_g(arr, "model.lora_rank", 0) or 0)
    targets = list(_g(arr, "model.target_modules", ["all-linear"]))
    P = shape.params
    T = shape.lora_params(lora_rank, targets) if lora_rank else P
    policy = bool(_g(actor_fsdp, "offload_policy", False)) and str(_g(arr, "actor.strategy", "fsdp")) == "fsdp2"
    param_offload = bool(_g(actor_fsdp, "param_offload", False))
    optimizer_offload = bool(_g(actor_fsdp, "optimizer_offload", False))
    checkpointing = bool(_g(arr, "model.enable_gradient_checkpointing", True))
    seq = int(_g(config, "data.max_prompt_length", 1024)) + int(_g(config, "data.max_response_length", 1024))
    micro = int(_g(arr, "actor.ppo_micro_batch_size_per_gpu", 1) or 1)
    lp_micro = int(_g(arr, "rollout.log_prob_micro_batch_size_per_gpu", micro) or micro)
    ref_micro = int(_g(arr, "ref.log_prob_micro_batch_size_per_gpu", lp_micro) or lp_micro)
    use_ref = (bool(_g(arr, "actor.use_kl_loss", False)) or bool(_g(config, "algorithm.use_kl_in_reward", False))) \
        and not lora_rank

    weights, grads, adam = P * d / world, T * d / world, 2 * T * d / world
    streamed = 2 * shape.layer_params * 2  # two bf16 layers (in use + prefetched)
    layer_full = lambda n: n * seq * 2 * (9 * shape.hidden + 2 * shape.intermediate)  # noqa: E731
    checkpoints = lambda n: shape.layers * n * seq * shape.hidden * 2  # noqa: E731
    logits = lambda n, copies: n * seq * shape.vocab * 4 * copies  # noqa: E731
    resident = {}  # actor state that stays on the GPU between phases
    if not policy and not param_offload:
        resident["actor weights (not offloaded)"] = weights
    if not policy and not optimizer_offload:
        resident["Adam states (not offloaded)"] = adam

    phases: dict[str, dict[str, float]] = {}
    util = float(_g(arr, "rollout.gpu_memory_utilization", 0.5))
    kv_capacity = None
    if gpu_gb:
        vllm = util * gpu_gb * GIB
        phases["rollout"] = {"vLLM reserve (gpu_memory_utilization)": vllm, **resident}
        kv_capacity = vllm - 2 * P / tp - VLLM_OVERHEAD_GB * GIB
    forward_weights = {"actor weights (streamed by the offload policy)": streamed} if policy else \
        {"actor weights": weights}
    phases["old_log_prob"] = {**forward_weights, **{k: v for k, v in resident.items() if "Adam" in k},
                              "logits (fp32)": logits(lp_micro, 2), "activations (one layer)": layer_full(lp_micro)}
    if use_ref:
        phases["ref_log_prob"] = {"reference weights (streamed: CPU offload policy)": 2 * shape.layer_params * ref_d,
                                  **resident, "logits (fp32)": logits(ref_micro, 2),
                                  "activations (one layer)": layer_full(ref_micro)}
    update = {"actor weights (streamed by the offload policy)": streamed} if policy else \
        {"actor weights": weights, "gradients": grads, "Adam states": adam}
    update["activations" + (" (checkpointed)" if checkpointing else "")] = (
        checkpoints(micro) + layer_full(micro) if checkpointing else shape.layers * layer_full(micro))
    update["logits and their gradient (fp32)"] = logits(micro, 3)
    phases["update"] = update

    replicas = max(1, gpus_per_node // tp)
    host = {"Ray, Python, environment workers": HOST_BASE_GB * GIB}
    per_node = gpus_per_node
    if policy:
        host["actor weights + grads + Adam (offload policy)"] = (weights + grads + adam) * per_node
    else:
        if param_offload:
            host["actor weights (param_offload)"] = weights * per_node
        if optimizer_offload:
            host["Adam states (optimizer_offload)"] = adam * per_node
    if use_ref:
        host["reference weights (offload policy)"] = P * ref_d / world * per_node
    if bool(_g(arr, "rollout.free_cache_engine", True)):
        host["vLLM weights while asleep"] = 2 * P * replicas
    host_peak_start = HOST_BASE_GB * GIB + P * d * per_node  # every rank's full state dict while loading

    totals = {name: sum(items.values()) for name, items in phases.items()}
    host_total = max(sum(host.values()), host_peak_start)
    plan: dict[str, Any] = {
        "model": {"path": str(_g(arr, "model.path")), "params_b": round(P / 1e9, 3),
                  "trainable_b": round(T / 1e9, 4), "model_dtype": str(_g(actor_fsdp, "model_dtype", "fp32")),
                  "sequence_tokens": seq, "world_size": world},
        "gpu_gb": gpu_gb, "margin": margin,
        "phases_gb": {name: {**{k: _gb(v) for k, v in items.items()}, "total": _gb(totals[name])}
                      for name, items in phases.items()},
        "host_gb_per_node": {**{k: _gb(v) for k, v in host.items()}, "start-up peak": _gb(host_peak_start),
                             "total": _gb(host_total)},
        "host_memory_gb": host_gb,
    }
    if kv_capacity is not None:
        max_len = int(_g(arr, "rollout.max_model_len", seq) or seq)
        plan["kv_cache"] = {"gb": _gb(max(kv_capacity, 0)), "tokens": int(max(kv_capacity, 0) // shape.kv_bytes_per_token),
                            "full_length_sequences": round(max(kv_capacity, 0) / (max_len * shape.kv_bytes_per_token), 1)}
    plan["message"] = _refusal(plan, totals, phases, host_total, gpu_gb, host_gb, margin, config, kv_capacity, shape)
    plan["fits"] = plan["message"] is None
    return plan


def _refusal(plan, totals, phases, host_total, gpu_gb, host_gb, margin, config, kv_capacity, shape) -> str | None:
    arr = config["actor_rollout_ref"]
    if gpu_gb:
        limit = gpu_gb * (1 - margin) * GIB
        for name, total in totals.items():
            if total <= limit:
                continue
            items = phases[name]
            biggest = ", ".join(f"{k} {_gb(v):g}" for k, v in sorted(items.items(), key=lambda kv: -kv[1])[:3])
            head = (f"the {name.replace('_', ' ')} phase needs {_gb(total):g} GiB per GPU, more than "
                    f"{gpu_gb:g} GiB less a {margin:.0%} margin ({biggest})")
            return f"{head}: {_fix(name, items, config)}"
        if kv_capacity is not None:
            max_len = int(_g(arr, "rollout.max_model_len", 0) or plan["model"]["sequence_tokens"])
            if kv_capacity < max_len * shape.kv_bytes_per_token:
                return (f"vLLM's KV cache ({_gb(max(kv_capacity, 0)):g} GiB) cannot hold one sequence of "
                        f"rollout.max_model_len={max_len} tokens: raise actor_rollout_ref.rollout."
                        f"gpu_memory_utilization (now {_g(arr, 'rollout.gpu_memory_utilization')}) or lower "
                        "max_model_len")
    if host_gb and host_total > host_gb * GIB:
        return (f"needs {_gb(host_total):g} GiB of host RAM per node, the node has {host_gb:g}: use LoRA "
                "(preset=qwen2.5-7b-a100-40g-lora), model_dtype bf16, or a node with more RAM")
    return None


def _fix(phase: str, items: dict[str, float], config: Any) -> str:
    arr = config["actor_rollout_ref"]
    if phase == "rollout":
        return (f"lower actor_rollout_ref.rollout.gpu_memory_utilization (now {_g(arr, 'rollout.gpu_memory_utilization')})"
                " or offload the actor between phases (actor.fsdp_config.param_offload / optimizer_offload)")
    state = sum(v for k, v in items.items() if k.startswith(("actor weights", "gradients", "Adam")))
    if state >= sum(items.values()) / 2 and "streamed" not in " ".join(items):
        if _g(arr, "model.lora_rank", 0):
            return ("set actor_rollout_ref.actor.fsdp_config.model_dtype=bf16 (the frozen base in bf16 halves it) "
                    "or actor.fsdp_config.offload_policy=true with strategy fsdp2")
        if str(_g(arr, "actor.strategy", "fsdp")) != "fsdp2":
            return ("set actor_rollout_ref.actor.strategy=fsdp2 and actor_rollout_ref.actor.fsdp_config."
                    "offload_policy=true (params, grads and Adam stay on the host; Adam steps on the CPU), or use LoRA")
        return ("set actor_rollout_ref.actor.fsdp_config.offload_policy=true (params, grads and Adam stay on the "
                "host; Adam steps on the CPU), or use LoRA, or model_dtype bf16")
    knob = "ppo_micro_batch_size_per_gpu" if phase == "update" else "log_prob_micro_batch_size_per_gpu"
    section = "actor" if phase == "update" else ("ref" if phase == "ref_log_prob" else "rollout")
    return (f"lower actor_rollout_ref.{section}.{knob} (now {_g(arr, f'{section}.{knob}')}) or "
            "data.max_prompt_length + data.max_response_length")
