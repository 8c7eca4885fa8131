"""verl's device layer on a CPU-only machine: a "cpu" platform, the FSDP engine for it, gloo, unpinned offload.

verl 0.9.1 has no CPU platform: its platform manager falls back to nvidia and the first collective fails
with "Distributed package doesn't have NCCL built in". Everything here goes through a point verl exposes
for this purpose or, where verl has no such point, rebinds one name verl looks up at call time:

1. `PlatformRegistry.register(platform="cpu")`: device "cpu", backend gloo, Ray resource "GPU" (verl's
   placement groups then ask for *logical* GPUs: start Ray with `num_gpus=1`), a device module whose
   memory/stream/seed calls are no-ops. `current_device()` is the string "cpu", because verl passes
   `get_device_id()` straight to `Tensor.to()`, where the int 0 would mean cuda:0.
2. `EngineRegistry`: verl registers its FSDP engines for cuda/npu only; the same classes are registered
   for device "cpu" (the engine is device-agnostic once the platform answers "cpu"), the language model's
   as `constrained_engine.ConstrainedFSDPEngineWithLMHead` (verl's engine plus the grammar constraint of
   the CPU rollout's `aflow_grammar`; unchanged for batches without one).
3. `initialize_global_process_group_ray` builds the backend string "cpu:gloo,{device}:{backend}", which is
   "cpu:gloo,cpu:gloo" here and torch rejects ("Duplicate device type cpu"). The function is wrapped so
   that, on the cpu platform only, the backend is "cpu:gloo". It is rebound in `verl.utils.distributed`
   (modules imported later bind the wrapper) and in any module that already imported it.
4. The FSDP2 engine builds `CPUOffloadPolicy(pin_memory=True)` for forward-only models (the reference
   policy); pinning needs an accelerator. The engine module's `CPUOffloadPolicy` name is rebound to a
   factory that returns the same policy unpinned.

`install()` does all four and is idempotent; it runs when `agent_system.verl_cpu` is imported (verl imports
that package in every process through `VERL_USE_EXTERNAL_MODULES`). Points 3 and 4 only change behaviour on
the cpu platform, so a GPU process that imports the plugin is unaffected.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from types import ModuleType, SimpleNamespace
from typing import Any

import torch
from verl.plugin.platform import PlatformBase, PlatformRegistry

PLATFORM_NAME = "cpu"
GLOO_BACKEND = "cpu:gloo"
_PATCH_MARK = "_aflow_verl_cpu"


def _noop(*args: Any, **kwargs: Any) -> None:
    return None


def _device_module() -> ModuleType | SimpleNamespace:
    """`torch.cpu` plus the cuda-only calls verl makes on the device module (memory stats, streams, IPC)."""
    stub = SimpleNamespace(**{name: getattr(torch.cpu, name) for name in dir(torch.cpu) if not name.startswith("_")})
    for name in ("empty_cache", "reset_peak_memory_stats", "set_device", "manual_seed", "manual_seed_all",
                 "ipc_collect", "reset_accumulated_memory_stats"):
        setattr(stub, name, _noop)
    for name in ("memory_allocated", "memory_reserved", "max_memory_allocated", "max_memory_reserved"):
        setattr(stub, name, lambda *a, **k: 0)
    stub.mem_get_info = lambda *a, **k: (0, 0)
    stub.memory_stats = lambda *a, **k: {}
    stub.is_available = lambda: True
    stub.device_count = lambda: 1
    stub.current_device = lambda: PLATFORM_NAME
    stub.synchronize = _noop
    stub.get_device_name = lambda *a, **k: PLATFORM_NAME
    stub.manual_seed = torch.manual_seed
    stub.manual_seed_all = torch.manual_seed
    # the "device" RNG is the CPU's: verl's checkpoint resume restores it under the device name "cpu"
    stub.get_rng_state = torch.get_rng_state
    stub.set_rng_state = torch.set_rng_state
    return stub


class PlatformCPU(PlatformBase):
    """The host CPU as verl's accelerator: one logical device per worker, gloo collectives."""

    _module = None

    @property
    def device_name(self) -> str:
        return PLATFORM_NAME

    @property
    def vendor_name(self) -> str:
        return "cpu"

    @property
    def device_module(self):
        if PlatformCPU._module is None:
            PlatformCPU._module = _device_module()
        return PlatformCPU._module

    def is_available(self) -> bool:
        return True

    def is_platform_available(self, use_smi_check: bool = False) -> bool:
        # Registered after cuda/npu/rocm, so auto-detection only reaches it when none of them is present.
        return True

    def current_device(self):
        return PLATFORM_NAME

    def device_count(self) -> int:
        return 1

    def set_device(self, device_index: int) -> None:
        return None

    def synchronize(self, device_index: int | None = None) -> None:
        return None

    def manual_seed(self, seed: int) -> None:
        torch.manual_seed(seed)

    def manual_seed_all(self, seed: int) -> None:
        torch.manual_seed(seed)

    def set_allocator_settings(self, settings: str) -> None:
        return None

    def empty_cache(self) -> None:
        return None

    def get_device_capability(self, device_index: int = 0):
        return None, None

    def communication_backend_name(self) -> str:
        return "gloo"

    def visible_devices_envvar(self) -> str:
        # Ray sets CUDA_VISIBLE_DEVICES for actors holding logical GPUs; verl reads the name, never a device.
        return "CUDA_VISIBLE_DEVICES"

    @contextlib.contextmanager
    def nvtx_range(self, msg: str):
        yield

    def profiler_start(self) -> None:
        return None

    def profiler_stop(self) -> None:
        return None

    def ray_resource_name(self) -> str:
        return "GPU"

    def ray_noset_envvars(self) -> list[str]:
        return []

    def is_ipc_supported(self) -> bool:
        return False

    def cudart(self):
        return None


def _on_cpu() -> bool:
    from verl.utils.device import get_device_name

    return get_device_name() == PLATFORM_NAME


def _gloo_process_group(original):
    @functools.wraps(original)
    def initialize_global_process_group_ray(timeout_second=None, backend=None):
        if backend is None and _on_cpu():
            backend = GLOO_BACKEND
        return original(timeout_second=timeout_second, backend=backend)

    setattr(initialize_global_process_group_ray, _PATCH_MARK, True)
    return initialize_global_process_group_ray


def _unpinned_offload_policy(policy_cls):
    @functools.wraps(policy_cls, updated=())
    def cpu_offload_policy(*args, **kwargs):
        if _on_cpu():
            kwargs["pin_memory"] = False
        return policy_cls(*args, **kwargs)

    setattr(cpu_offload_policy, _PATCH_MARK, True)
    return cpu_offload_policy


def _rebind(module: ModuleType, name: str, wrap) -> None:
    """Replace `module.name` by `wrap(original)`, and in every verl module that already imported it by name."""
    original = getattr(module, name)
    if getattr(original, _PATCH_MARK, False):
        return
    replacement = wrap(original)
    for other in list(sys.modules.values()):
        if getattr(other, "__name__", "").startswith("verl") and getattr(other, name, None) is original:
            setattr(other, name, replacement)


def _register_engines() -> None:
    from verl.workers.engine.base import EngineRegistry
    from verl.workers.engine.fsdp import transformer_impl

    from agent_system.verl_cpu.constrained_engine import ConstrainedFSDPEngineWithLMHead

    # the language model recomputes log-probs under the rollout's grammar constraint, when a batch has one
    engines = {"language_model": ConstrainedFSDPEngineWithLMHead,
               "value_model": transformer_impl.FSDPEngineWithValueHead}
    for model_type, engine in engines.items():
        for backend in ("fsdp", "fsdp2"):
            if EngineRegistry._engines.get(model_type, {}).get(backend, {}).get(PLATFORM_NAME) is None:
                EngineRegistry.register(model_type=model_type, backend=backend, device=PLATFORM_NAME)(engine)
    # only the engine's name: other verl modules keep torch's class (e.g. for isinstance checks)
    if not getattr(transformer_impl.CPUOffloadPolicy, _PATCH_MARK, False):
        transformer_impl.CPUOffloadPolicy = _unpinned_offload_policy(transformer_impl.CPUOffloadPolicy)


def use_every_core() -> None:
    """Ray starts an actor that asks for no CPUs with OMP_NUM_THREADS=1, so torch computes on one thread:
    the rollout server generated 4 x 128 tokens in 101 s and the FSDP update ran likewise. The phases of a
    step run one after another (generate, then update), so each compute-heavy process may use every core
    this machine gives it."""
    import os

    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if torch.get_num_threads() < cores:
        torch.set_num_threads(cores)


def install() -> None:
    """Register the cpu platform and the FSDP engines for it; wrap the process group and offload policy;
    let torch use every core."""
    import verl.utils.distributed as distributed

    use_every_core()
    if PlatformRegistry.get(PLATFORM_NAME) is None:
        PlatformRegistry.register(platform=PLATFORM_NAME)(PlatformCPU)
    _rebind(distributed, "initialize_global_process_group_ray", _gloo_process_group)
    _register_engines()
