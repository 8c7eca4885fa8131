"""A CPU rollout for verl's classic trainer: the project's transformers generation backend as a verl replica.

verl 0.9.1 registers only vLLM, SGLang and TRT-LLM rollouts. A rollout has two halves, each with its own
registry, and this module fills both under the name `cpu` (`actor_rollout_ref.rollout.name=cpu`):

* trainer side, `RolloutReplicaRegistry` -> `CPUReplica`: `LLMServerManager` builds one replica per rollout
  world (tensor parallel size 1: one per actor worker) and calls `init_hybrid(worker_group)`, which calls
  `launch_servers`. The replica starts one `CPUGenerationServer` Ray actor, named after its rank, on the
  node of its actor worker. verl's load balancer then sends every agent loop's
  `server_manager.generate(...)` to that actor's `generate`, and the checkpoint-engine manager calls
  `sleep`/`wake_up` on it around each weight sync.
* worker side, `_ROLLOUT_REGISTRY[("cpu", "async")]` -> `CPUServerAdapter`: the FSDP worker
  (`ActorRolloutRefWorker`) builds it as its `rollout`. With the checkpoint engine backend "naive", verl's
  `update_weights` hands it the actor's full tensors (`get_per_tensor_param`) after every update; the
  adapter copies them to host memory and pushes them into its replica's server, so the next rollout
  samples from the updated policy.

The generation itself is `agent_system.agent_loop.cpu_server.CPUServerManager` (batching, sampling, log-prob
conventions, in-place weight update), held by the server actor; nothing of it is repeated here.
"""

from __future__ import annotations

import asyncio
import os
from types import SimpleNamespace
from typing import Any

import ray
import torch
from verl.workers.rollout.base import _ROLLOUT_REGISTRY, BaseRollout
from verl.workers.rollout.replica import RolloutMode, RolloutReplica, RolloutReplicaRegistry, TokenOutput

ROLLOUT_NAME = "cpu"
SERVER_NAME_PREFIX = "aflow_cpu_server"


def server_name(replica_rank: int) -> str:
    """The Ray actor name shared by a replica (which creates the server) and its adapter (which finds it)."""
    return f"{SERVER_NAME_PREFIX}_{replica_rank}"


def _per_replica(config: Any) -> int:
    return (int(config.tensor_model_parallel_size) * int(config.data_parallel_size)
            * int(config.pipeline_model_parallel_size))


def _model_dir(model_config: Any) -> str:
    """The local HF directory of the policy (`local_path` on verl's HFModelConfig, else the configured path)."""
    local = model_config.get("local_path", None) if hasattr(model_config, "get") else None
    if local:
        return str(local)
    from verl.utils.fs import copy_to_local

    return copy_to_local(str(model_config.get("path") if hasattr(model_config, "get") else model_config.path))


class CPUGenerationServer:
    """Ray actor: verl's rollout-server contract around a `CPUServerManager` on this process's CPU.

    verl's vLLM server frees device memory in `sleep` and restores it in `wake_up`; a CPU process has no
    device memory to hand back and keeps no KV cache between requests, so those calls (and the kv-cache,
    abort and profiling calls) only exist to satisfy the contract.
    """

    def __init__(self, config: Any, model_config: Any, replica_rank: int):
        from agent_system.agent_loop.cpu_server import CPUServerManager
        from agent_system.policy_model import load_policy

        model, tokenizer = load_policy(_model_dir(model_config))
        # CPUServerManager reads its defaults from `config.actor_rollout_ref.rollout` (here the RolloutConfig)
        self.engine = CPUServerManager(SimpleNamespace(actor_rollout_ref=SimpleNamespace(rollout=config)),
                                       model=model, tokenizer=tokenizer)
        self.replica_rank = replica_rank
        # names that share storage (tied embeddings) form one group: a sync must cover every group
        groups: dict[int, list[str]] = {}
        for name, tensor in model.state_dict().items():
            groups.setdefault(tensor.data_ptr(), []).append(name)
        self._weight_groups = list(groups.values())

    async def ready(self) -> int:
        return self.replica_rank

    async def generate(self, request_id: str, *, prompt_ids: list[int], sampling_params: dict[str, Any],
                       image_data: Any = None, video_data: Any = None, **kwargs: Any) -> TokenOutput:
        return await self.engine.generate(request_id, prompt_ids=prompt_ids, sampling_params=sampling_params,
                                          image_data=image_data, video_data=video_data, **kwargs)

    async def update_weights(self, weights: dict[str, torch.Tensor], global_steps: int | None = None) -> int:
        """Copy the actor's tensors into the model (under the engine's lock); returns the weight version.

        A tied weight may arrive under either of its names, so completeness is checked per storage group
        (unknown names are still refused by `CPUServerManager.update_weights`).
        """
        missing = [names[0] for names in self._weight_groups if not any(name in weights for name in names)]
        if missing:
            raise KeyError(f"weight sync is missing {len(missing)} tensor(s), e.g. {missing[:3]}")
        version = await asyncio.to_thread(self.engine.update_weights, weights, strict=False)
        self.engine.set_global_steps(global_steps)
        return version

    async def weight_version(self) -> int:
        return self.engine.weight_version

    async def sleep(self) -> None:
        return None

    async def wake_up(self) -> None:
        return None

    async def clear_kv_cache(self) -> None:
        return None

    async def release_kv_cache(self) -> None:
        return None

    async def resume_kv_cache(self) -> None:
        return None

    async def abort_all_requests(self, reject_request: bool = False) -> dict[str, Any]:
        return {}

    async def resume_generation(self) -> None:
        return None

    async def start_profile(self, **kwargs: Any) -> None:
        return None

    async def stop_profile(self) -> None:
        return None


class CPUReplica(RolloutReplica):
    """One `CPUGenerationServer` per actor worker (hybrid mode: the rollout shares the trainer's placement)."""

    def __init__(self, replica_rank: int, config: Any, model_config: Any, gpus_per_node: int = 8,
                 is_reward_model: bool = False, is_teacher_model: bool = False, name_suffix: str = ""):
        super().__init__(replica_rank, config, model_config, gpus_per_node, is_reward_model, is_teacher_model,
                         name_suffix)
        if self.world_size != 1:
            raise ValueError(f"the cpu rollout serves one process per replica: tensor/data/pipeline parallel "
                             f"sizes must be 1 (world size {self.world_size})")
        if is_reward_model or is_teacher_model:
            raise ValueError("the cpu rollout serves the policy only (no reward or teacher model replicas)")

    async def launch_servers(self) -> None:
        if self.rollout_mode != RolloutMode.HYBRID:
            raise NotImplementedError(f"the cpu rollout runs in hybrid mode only, not {self.rollout_mode}")
        worker = self.workers[0]
        node_id = await worker.__ray_call__.remote(lambda _self: ray.get_runtime_context().get_node_id())
        strategy = ray.util.scheduling_strategies.NodeAffinitySchedulingStrategy(node_id=node_id, soft=False)
        server = ray.remote(CPUGenerationServer).options(
            scheduling_strategy=strategy, name=server_name(self.replica_rank), max_concurrency=self.max_concurrency,
        ).remote(config=self.config, model_config=self.model_config, replica_rank=self.replica_rank)
        await server.ready.remote()
        self.servers = [server]
        self._server_handle = server
        # verl keys its load balancer by address; there is no HTTP endpoint behind this one
        self._server_address = server_name(self.replica_rank)


class CPUServerAdapter(BaseRollout):
    """The FSDP worker's rollout: forwards weight syncs and sleep/wake calls to its replica's server."""

    def __init__(self, config: Any, model_config: Any, device_mesh: Any, replica_rank: int = -1):
        super().__init__(config, model_config, device_mesh)
        rank = int(os.environ.get("RANK", 0))
        per_replica = _per_replica(self.config)
        self.replica_rank = rank // per_replica if replica_rank == -1 else replica_rank
        self.is_leader = rank % per_replica == 0
        self._server = None

    @property
    def server(self):
        if self._server is None:
            self._server = ray.get_actor(server_name(self.replica_rank))
        return self._server

    async def resume(self, tags: list[str]) -> None:
        if self.is_leader:
            await self.server.wake_up.remote()

    async def release(self) -> None:
        if self.is_leader:
            await self.server.sleep.remote()

    async def update_weights(self, weights, wire_format: str = "named_tensors", peft_config: Any = None,
                             global_steps: int | None = None, **kwargs: Any) -> None:
        """Push full tensors to the server. Every rank drains the generator: it all-gathers FSDP shards."""
        if wire_format != "named_tensors":
            raise NotImplementedError(f"the cpu rollout takes named tensors, not {wire_format!r}")
        if peft_config is not None:
            raise NotImplementedError("the cpu rollout takes merged weights: set actor_rollout_ref.model.lora.merge=true")
        state = {name: tensor.detach().to("cpu", copy=True) for name, tensor in weights}
        if self.is_leader:
            await self.server.update_weights.remote(state, global_steps)


def install() -> None:
    """Register the cpu rollout with both of verl's rollout registries (idempotent)."""
    RolloutReplicaRegistry.register(ROLLOUT_NAME, lambda: CPUReplica)
    _ROLLOUT_REGISTRY[(ROLLOUT_NAME, "async")] = f"{CPUServerAdapter.__module__}.{CPUServerAdapter.__qualname__}"
