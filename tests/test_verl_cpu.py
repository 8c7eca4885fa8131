"""agent_system.verl_cpu: the verl 0.9.1 internals it registers with or rebinds are still there, as expected.

Each of the plugin's registrations leans on a name, signature or line of verl 0.9.1. These tests pin them
against the installed verl, so an upgrade fails here, with the point that moved, rather than inside a Ray
worker halfway through a run. The plugin itself is then imported the way verl imports it
(VERL_USE_EXTERNAL_MODULES, in a fresh interpreter) and its effect checked; and a different verl version is
refused with one line.
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable


def _fresh(code: str, **env_vars: str) -> subprocess.CompletedProcess:
    """Run `code` in a new interpreter with this checkout first on the path."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
           **env_vars}
    return subprocess.run([PYTHON, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def _params(fn) -> list[str]:
    return list(inspect.signature(inspect.unwrap(fn)).parameters)


# ----------------------------------------------------------------------------- verl's side, pinned


def test_verl_is_the_supported_release():
    import verl

    from agent_system.verl_cpu import SUPPORTED_VERL

    assert verl.__version__ == SUPPORTED_VERL


def test_verl_imports_external_modules_from_its_init():
    import verl

    source = Path(verl.__file__).read_text()
    assert 'os.getenv("VERL_USE_EXTERNAL_MODULES", "")' in source and "import_external_libs(modules)" in source


def test_platform_registry_and_base():
    from verl.plugin.platform import PlatformBase, PlatformRegistry, platform_manager

    assert _params(PlatformRegistry.register) == ["platform"]
    assert callable(PlatformRegistry.get)
    assert 'os.environ.get("VERL_PLATFORM"' in inspect.getsource(platform_manager._detect_platform_name)
    from agent_system.verl_cpu.platform import PlatformCPU

    PlatformCPU()  # every abstract method of PlatformBase is implemented
    assert issubclass(PlatformCPU, PlatformBase)


def test_process_group_backend_string_is_what_the_wrapper_replaces():
    from verl.utils import distributed

    fn = inspect.unwrap(distributed.initialize_global_process_group_ray)
    assert _params(fn) == ["timeout_second", "backend"]
    assert 'backend = backend or f"cpu:gloo,{get_device_name()}:{get_nccl_backend()}"' in inspect.getsource(fn)
    from verl.checkpoint_engine import base as checkpoint_base
    from verl.workers import engine_workers

    # both bind the function by name at import time: the plugin must rebind it before they are imported
    for module in (engine_workers, checkpoint_base):
        assert "from verl.utils.distributed import initialize_global_process_group_ray" in inspect.getsource(module)


def test_engine_registry_and_fsdp_engines():
    from verl.workers.engine.base import EngineRegistry
    from verl.workers.engine.fsdp import transformer_impl

    assert _params(EngineRegistry.register) == ["model_type", "backend", "device", "vendor"]
    assert isinstance(EngineRegistry._engines, dict)
    for model_type, name in (("language_model", "FSDPEngineWithLMHead"), ("value_model", "FSDPEngineWithValueHead")):
        engine = getattr(transformer_impl, name)
        for backend in ("fsdp", "fsdp2"):
            assert EngineRegistry._engines[model_type][backend]["cuda"] is engine


def test_constrained_engine_points():
    """What ConstrainedFSDPEngineWithLMHead relies on: the hook's signature and its call, the output_args
    names of the temperature, the packed log-prob layout it corrects, the response slice, per-sample
    non-tensor fields read back as lists, and the tokenizer on the model config."""
    from verl.workers.config.model import HFModelConfig
    from verl.workers.engine.fsdp import transformer_impl
    from verl.workers.utils import padding

    engine = transformer_impl.FSDPEngineWithLMHead
    assert _params(engine.prepare_model_outputs) == ["self", "output", "output_args", "micro_batch",
                                                     "logits_processor_func"]
    assert "model_output = self.prepare_model_outputs(\n" in inspect.getsource(engine.forward_step)
    inputs = inspect.getsource(engine.prepare_model_inputs)
    assert 'output_args["temperature_rmpad"] = temperature_rmpad' in inputs
    assert 'output_args["temperature"] = temperature' in inputs
    assert "input_ids_rmpad_rolled = torch.roll(input_ids_rmpad, shifts=-1, dims=1)" in inputs
    outputs = inspect.getsource(engine.prepare_model_outputs)
    assert "log_probs = torch.nested.nested_tensor_from_jagged(log_probs, cu_seqlens)" in outputs
    assert 'model_output["log_probs"] = log_probs' in outputs
    assert "values[seq_offset - resp_len - 1 : seq_offset - 1]" in inspect.getsource(padding.no_padding_2_padding)
    assert "tokenizer" in HFModelConfig.__dataclass_fields__

    import numpy as np
    import torch
    from verl import DataProto
    from verl.utils import tensordict_utils as tu

    states = np.empty(3, dtype=object)
    states[:] = [[0, 5, -1], [2, 3], []]
    batch = DataProto.from_dict(tensors={"x": torch.zeros(3, 1)}, non_tensors={
        "constraint_states": states, "constraint_grammar": np.array(["canvas-answer", "canvas-code", ""],
                                                                    dtype=object)}).to_tensordict()
    picked = tu.index_select_tensor_dict(batch, [2, 0])
    assert tu.get(picked, "constraint_states") == [[], [0, 5, -1]]
    assert tu.get(picked, "constraint_grammar") == ["", "canvas-answer"]


def test_fsdp2_reference_offload_policy_is_pinned_by_name():
    from verl.workers.engine.fsdp import transformer_impl

    assert "offload_policy = CPUOffloadPolicy(pin_memory=True)" in inspect.getsource(transformer_impl)
    assert hasattr(transformer_impl, "CPUOffloadPolicy")


def test_rollout_registries():
    from verl.workers.rollout import base, replica

    assert _params(replica.RolloutReplicaRegistry.register) == ["name", "loader"]
    assert callable(replica.RolloutReplicaRegistry.get)
    assert _params(replica.RolloutReplica.__init__) == [
        "self", "replica_rank", "config", "model_config", "gpus_per_node", "is_reward_model", "is_teacher_model",
        "name_suffix"]
    assert "launch_servers" in replica.RolloutReplica.__abstractmethods__
    assert replica.RolloutMode.HYBRID.value == "hybrid"
    assert base._ROLLOUT_REGISTRY[("vllm", "async")] == "verl.workers.rollout.vllm_rollout.ServerAdapter"
    assert base.BaseRollout.__abstractmethods__ == {"resume", "update_weights", "release"}
    assert _params(base.BaseRollout.__init__)[:4] == ["self", "config", "model_config", "device_mesh"]


def test_naive_weight_sync_calls_the_worker_rollout():
    from verl.checkpoint_engine.base import CheckpointEngineManager, CheckpointEngineRegistry
    from verl.workers.engine_workers import ActorRolloutRefWorker

    assert CheckpointEngineRegistry.get("naive") is not None
    assert 'if self.backend == "naive":' in inspect.getsource(CheckpointEngineManager.update_weights)
    source = inspect.getsource(ActorRolloutRefWorker.update_weights)
    assert "await self.rollout.update_weights(\n            per_tensor_param, peft_config=peft_config" in source
    assert 'await self.rollout.resume(tags=["weights"])' in source


def test_server_contract_called_by_verl():
    from verl.workers.rollout import llm_server

    source = inspect.getsource(llm_server.LLMServerClient.generate)
    assert "await server.generate.remote(" in source
    from agent_system.verl_cpu.rollout import CPUGenerationServer

    assert _params(CPUGenerationServer.generate)[:4] == ["self", "request_id", "prompt_ids", "sampling_params"]
    for method in ("sleep", "wake_up", "clear_kv_cache", "abort_all_requests", "resume_generation",
                   "release_kv_cache", "resume_kv_cache", "start_profile", "stop_profile"):
        assert callable(getattr(CPUGenerationServer, method))


# ----------------------------------------------------------------------------- the plugin, as verl loads it


def test_plugin_loaded_by_verl_registers_everything():
    code = """
import json, os, socket, torch
import verl
from verl.utils.device import get_device_name, get_device_id
from verl.workers.engine.base import EngineRegistry
from verl.workers.engine.fsdp import transformer_impl
from verl.workers import engine_workers
from verl.workers.rollout.base import get_rollout_class
from verl.workers.rollout.replica import RolloutReplicaRegistry
with socket.socket() as s:
    s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
engine_workers.initialize_global_process_group_ray(timeout_second=60)
print(json.dumps({
    "device": get_device_name(), "device_id": str(get_device_id()),
    "engine": EngineRegistry.get_engine_cls("language_model", "fsdp2").__name__,
    "value_engine": EngineRegistry.get_engine_cls("value_model", "fsdp").__name__,
    "pg_backend": str(torch.distributed.get_backend()),
    "pinned": transformer_impl.CPUOffloadPolicy(pin_memory=True).pin_memory,
    "adapter": get_rollout_class("cpu", "async").__qualname__,
    "replica": RolloutReplicaRegistry.get("cpu").__qualname__,
}))
torch.distributed.destroy_process_group()
from verl.utils.checkpoint.checkpoint_manager import BaseCheckpointManager
BaseCheckpointManager.load_rng_state(BaseCheckpointManager.get_rng_state())  # what a resume does
"""
    result = _fresh(code, VERL_USE_EXTERNAL_MODULES="agent_system.verl_cpu.plugin", VERL_PLATFORM="cpu")
    assert result.returncode == 0, result.stderr[-3000:]
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert seen == {"device": "cpu", "device_id": "cpu", "engine": "ConstrainedFSDPEngineWithLMHead",
                    "value_engine": "FSDPEngineWithValueHead", "pg_backend": "cpu:gloo", "pinned": False,
                    "adapter": "CPUServerAdapter", "replica": "CPUReplica"}


def test_reading_the_package_leaves_verl_as_it_ships():
    """Only `agent_system.verl_cpu.plugin` registers anything: a process that imports the package's other
    modules for their classes (these tests, the bench, the constrained-decoding tests) keeps verl's own
    registries and functions, so no test's verdict depends on which test imported what before it."""
    code = """
import json
import agent_system.verl_cpu, agent_system.verl_cpu.platform, agent_system.verl_cpu.rollout
import agent_system.verl_cpu.constrained_engine
import verl.utils.distributed as distributed
from verl.plugin.platform import PlatformRegistry
from verl.workers.rollout.replica import RolloutReplicaRegistry
seen = {"platform": PlatformRegistry.get("cpu") is not None,
        "rebound": hasattr(distributed.initialize_global_process_group_ray, "_aflow_verl_cpu")}
try:
    RolloutReplicaRegistry.get("cpu")
    seen["replica"] = True
except Exception:
    seen["replica"] = False
import agent_system.verl_cpu.plugin
seen["after"] = [PlatformRegistry.get("cpu") is not None,
                 hasattr(distributed.initialize_global_process_group_ray, "_aflow_verl_cpu")]
print(json.dumps(seen))
"""
    result = _fresh(code)
    assert result.returncode == 0, result.stderr[-3000:]
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert seen == {"platform": False, "rebound": False, "replica": False, "after": [True, True]}


@pytest.mark.parametrize("first", ["agent_system.verl_cpu.rollout", "agent_system.verl_cpu.platform", "verl"])
def test_a_ray_worker_may_import_any_module_first(first):
    """A Ray worker imports whatever it unpickles first (the rollout server's class lives in `rollout`),
    with the plugin named in VERL_USE_EXTERNAL_MODULES: verl's __init__ then imports the plugin while that
    first module is still being imported. Every order must end with the registrations in place."""
    code = f"""
import importlib, json
importlib.import_module({first!r})
from verl.plugin.platform import PlatformRegistry
from verl.workers.rollout.replica import RolloutReplicaRegistry
print(json.dumps([PlatformRegistry.get("cpu").__name__, RolloutReplicaRegistry.get("cpu").__name__]))
"""
    result = _fresh(code, VERL_USE_EXTERNAL_MODULES="agent_system.verl_cpu.plugin")
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == ["PlatformCPU", "CPUReplica"]


def test_other_verl_versions_are_refused_in_one_line():
    from agent_system.verl_cpu import check_verl_version

    with pytest.raises(RuntimeError) as caught:
        check_verl_version("0.9.2")
    message = str(caught.value)
    assert "\n" not in message and "verl 0.9.1 only" in message and "0.9.2" in message

    result = _fresh("import verl; verl.__version__ = '0.10.0'; import agent_system.verl_cpu.plugin")
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("RuntimeError: agent_system.verl_cpu supports verl 0.9.1 only, found verl 0.10.0")


# ----------------------------------------------------------------------------- the server, without Ray


def test_generation_server_generates_and_takes_whole_weight_syncs():
    """The replica's server: verl's generate contract, and weight syncs that must cover every tensor."""
    import asyncio
    from types import SimpleNamespace

    import torch

    from agent_system.policy_model import ensure_default_converted
    from agent_system.verl_cpu.rollout import CPUGenerationServer

    server = CPUGenerationServer(SimpleNamespace(response_length=4), {"path": str(ensure_default_converted())}, 0)
    out = asyncio.run(server.generate("r", prompt_ids=[1, 2, 3],
                                      sampling_params={"temperature": 0, "max_tokens": 3, "logprobs": True}))
    assert len(out.token_ids) == len(out.log_probs) == 3

    state = {name: tensor.clone() for name, tensor in server.engine.model.state_dict().items()}
    with pytest.raises(KeyError, match="missing"):
        asyncio.run(server.update_weights({"model.norm.weight": state["model.norm.weight"]}))
    state["model.norm.weight"] = torch.zeros_like(state["model.norm.weight"])
    tied = [name for name in ("lm_head.weight",) if name in state]
    for name in tied:  # a tied weight may come under one name only
        del state[name]
    assert asyncio.run(server.update_weights(state, global_steps=7)) == 1
    assert float(server.engine.model.model.norm.weight.abs().sum()) == 0.0
    out = asyncio.run(server.generate("r", prompt_ids=[1, 2, 3], sampling_params={"max_tokens": 1}))
    assert out.extra_fields["global_steps"] == 7


# ----------------------------------------------------------------------------- recipes.train, the verl path on CPU


def test_cpu_runtime_sends_the_plugin_to_every_ray_worker(monkeypatch):
    from recipes import train
    from recipes.config import compose

    config = compose(["preset=cpu-local"])  # imports verl before the variables below are set
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("VERL_USE_EXTERNAL_MODULES", "some.other_plugin")
    monkeypatch.setenv("VERL_PLATFORM", "cpu")
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    train.cpu_runtime(config)
    ray_init = config.ray_kwargs.ray_init
    env_vars = ray_init.runtime_env.env_vars
    assert env_vars.VERL_USE_EXTERNAL_MODULES == "some.other_plugin,agent_system.verl_cpu.plugin"
    assert env_vars.VERL_PLATFORM == "cpu"
    assert env_vars.PYTHONPATH == str(ROOT)  # the checkout, once
    assert ray_init.num_gpus == 1  # verl's placement group asks for one (logical) GPU
    assert (Path(config.actor_rollout_ref.model.path) / "config.json").is_file()  # "embedded", converted


class _FakeExecutor:
    base_url, model = "http://127.0.0.1:1/v1", "fake-model"

    def __init__(self):
        self.stopped = False

    def stop(self):
        self.stopped = True


def test_task_runner_starts_the_embedded_executor_when_no_base_url(monkeypatch):
    import ray

    from aflow import embedded
    from recipes import train
    from recipes.config import compose

    started = []
    monkeypatch.setattr(embedded, "start", lambda: started.append(_FakeExecutor()) or started[-1])
    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True}])
    config = compose(["preset=cpu-local"])
    with train.embedded_executor(config) as server:
        assert config.env.executor.base_url == server.base_url and config.env.executor.model == "fake-model"
    assert len(started) == 1 and started[0].stopped

    config = compose(["preset=cpu-local", "env.executor.base_url=http://example:8000/v1"])
    with train.embedded_executor(config) as server:
        assert server is None
    assert len(started) == 1

    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True}, {"Alive": True}])
    with pytest.raises(RuntimeError, match="2 nodes"), train.embedded_executor(compose(["preset=cpu-local"])):
        pass
    assert len(started) == 1
