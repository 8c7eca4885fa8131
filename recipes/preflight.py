"""Resource plan of a training config, compared with a cluster, so a job that cannot fit is refused
up front (Ray would otherwise wait forever for a placement group or an actor's CPUs).

    python -m recipes.preflight [--address ADDR] [--cluster-cpus N] [--cluster-gpus G] [overrides...]

Prints the plan as JSON; exit 3 (and the one-line reason on stderr) when it does not fit, 2 when the
config does not compose. The cluster is, in this order: --cluster-cpus/--cluster-gpus, the Ray
cluster at --address (ray.init + ray.cluster_resources()), the Ray cluster this process is already
connected to, else this machine (CPU count and GPUs from nvidia-smi, else torch.cuda).

What verl 0.9.1 (classic trainer, FSDP, hybrid engine) holds on the cluster:
- GPUs: trainer.n_gpus_per_node x trainer.nnodes in one "global_pool"; the actor, the reference
  policy, the vLLM rollout servers and a critic (when enabled) are all colocated there. Extra pools
  only for a reward model with reward.reward_model.enable_resource_pool and for distillation teachers.
- CPUs: every GPU of a pool is a placement-group bundle {"CPU": 3, "GPU": 1} (ResourcePoolManager's
  max_colocate_count, 3 in verl 0.9.1), held for the whole run.
- Actors declared with a bare @ray.remote (verl's TaskRunner, the agent-loop workers, the reward-loop
  workers, the vLLM server actors) use Ray's default: 1 CPU to be scheduled, 0 while running. They
  hold nothing, but each needs one free CPU at creation: the plan keeps one CPU of headroom for them.
- The AFlow environment workers (AFlowWorker actors) hold env.num_workers x
  env.resources_per_worker (num_cpus 0.5, num_gpus 0 by default).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from typing import Any

from omegaconf import DictConfig

# verl 0.9.1's ResourcePoolManager.max_colocate_count default: the CPUs of each GPU bundle
VERL_CPUS_PER_GPU = 3
# one free CPU so actors with Ray's default resources (1 CPU to schedule, 0 to run) can be created
SCHEDULING_HEADROOM_CPUS = 1.0


def _verl_cpus_per_gpu() -> int:
    try:
        from verl.single_controller.ray.base import ResourcePoolManager

        return int(ResourcePoolManager.__dataclass_fields__["max_colocate_count"].default)
    except Exception:  # verl missing or changed: the 0.9.1 value
        return VERL_CPUS_PER_GPU


def _num(value: float) -> float | int:
    value = float(value)
    return int(value) if value.is_integer() else round(value, 3)


def _fmt(value: float) -> str:
    return f"{float(value):g}"


# ---------------------------------------------------------------- cluster


def local_resources() -> dict[str, Any]:
    """This machine: CPUs this process may use, GPUs from nvidia-smi (else torch.cuda)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    gpus = 0
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20).stdout
            gpus = sum(1 for line in out.splitlines() if line.startswith("GPU"))
        except (OSError, subprocess.SubprocessError):
            gpus = 0
    if gpus == 0:
        try:
            import torch

            gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        except Exception:
            gpus = 0
    info = {"source": "local machine", "cpus": _num(cpus), "gpus": _num(gpus), "node_gpus": [_num(gpus)]}
    return {**info, **_merge_facts([node_facts()])}


def node_facts() -> dict[str, Any]:
    """This node: host RAM (GiB, /proc/meminfo), the smallest GPU's memory and the NVIDIA driver (nvidia-smi).
    Self-contained (run on every node of a Ray cluster by `cluster_node_facts`)."""
    import subprocess as sp

    facts: dict[str, Any] = {}
    try:
        with open("/proc/meminfo") as f:
            kib = next(int(line.split()[1]) for line in f if line.startswith("MemTotal:"))
        facts["host_memory_gb"] = round(kib / 1024**2, 1)
    except (OSError, StopIteration, ValueError):
        pass
    try:
        out = sp.run(["nvidia-smi", "--query-gpu=memory.total,driver_version", "--format=csv,noheader,nounits"],
                     capture_output=True, text=True, timeout=20).stdout
        rows = [[c.strip() for c in line.split(",")] for line in out.splitlines() if line.strip()]
        if rows:
            facts["gpu_memory_gb"] = round(min(float(r[0]) for r in rows) / 1024, 1)
            facts["nvidia_driver"] = rows[0][1]
    except (OSError, sp.SubprocessError, ValueError, IndexError):
        pass
    return facts


def _merge_facts(nodes: list[dict[str, Any]]) -> dict[str, Any]:
    """The binding facts of the nodes with a GPU (those run the trainer; a laptop's dry run of a GPU preset
    measures nothing): the smallest host RAM and GPU, the oldest driver."""
    nodes = [n for n in nodes if n.get("gpu_memory_gb")]
    merged: dict[str, Any] = {}
    for key in ("host_memory_gb", "gpu_memory_gb"):
        values = [n[key] for n in nodes if n.get(key)]
        if values:
            merged[key] = min(values)
    drivers = [n["nvidia_driver"] for n in nodes if n.get("nvidia_driver")]
    if drivers:
        merged["nvidia_driver"] = min(drivers, key=_version)
    return merged


def cluster_node_facts() -> list[dict[str, Any]]:
    """`node_facts` measured on every alive node of the connected Ray cluster (a zero-CPU task pinned to
    each), so host RAM and GPUs are those of the nodes that will run the job, not of the launching one."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    probe = ray.remote(num_cpus=0)(lambda: node_facts())
    refs = [probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)).remote()
            for node in ray.nodes() if node.get("Alive")]
    return ray.get(refs, timeout=120)


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(".") if part.isdigit())


# The oldest Linux driver each CUDA major version runs on (NVIDIA's minor-version compatibility table)
CUDA_MIN_DRIVER = {11: "450.80.02", 12: "525.60.13", 13: "580.65.06"}


def driver_refusal(driver: str | None, cuda: str | None) -> str | None:
    """One line when the NVIDIA driver is older than the installed torch's CUDA needs."""
    if not driver or not cuda:
        return None
    need = CUDA_MIN_DRIVER.get(_version(cuda)[0])
    if need is None or _version(driver) >= _version(need):
        return None
    return (f"the NVIDIA driver {driver} is older than CUDA {cuda} (the installed torch's) needs (>= {need}): "
            "update the driver, or install torch built for an older CUDA")


def torch_cuda() -> str | None:
    try:
        import torch

        return torch.version.cuda
    except Exception:  # torch missing or broken: nothing to compare
        return None


def ray_resources() -> dict[str, Any]:
    """The Ray cluster this process is connected to."""
    import ray

    total = ray.cluster_resources()
    node_gpus = [
        _num(node["Resources"].get("GPU", 0)) for node in ray.nodes() if node.get("Alive")
    ]
    return {"source": "ray cluster", "cpus": _num(total.get("CPU", 0)), "gpus": _num(total.get("GPU", 0)),
            "node_gpus": node_gpus or [0], **_merge_facts(cluster_node_facts())}


def detect_cluster(address: str | None = None) -> dict[str, Any]:
    import ray

    if address:
        ray.init(address=address, logging_level="ERROR", log_to_driver=False)
        try:
            return ray_resources()
        finally:
            ray.shutdown()
    if ray.is_initialized():
        return ray_resources()
    return local_resources()


def add_cluster_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", default=None,
                        help="Ray cluster to measure (GCS address or 'auto'); default: this machine")
    parser.add_argument("--cluster-cpus", type=float, default=None, help="use this CPU count instead of measuring")
    parser.add_argument("--cluster-gpus", type=float, default=None, help="use this GPU count instead of measuring")


def cluster_from_args(args: argparse.Namespace) -> dict[str, Any]:
    if args.cluster_cpus is not None and args.cluster_gpus is not None:
        gpus = _num(args.cluster_gpus)
        return {"source": "command line", "cpus": _num(args.cluster_cpus), "gpus": gpus, "node_gpus": [gpus]}
    cluster = detect_cluster(args.address)
    if args.cluster_cpus is not None:
        cluster.update(cpus=_num(args.cluster_cpus), source=cluster["source"] + " (CPUs from command line)")
    if args.cluster_gpus is not None:
        gpus = _num(args.cluster_gpus)
        cluster.update(gpus=gpus, node_gpus=[gpus], source=cluster["source"] + " (GPUs from command line)")
    return cluster


# ---------------------------------------------------------------- plan


def _get(node, key: str, default=None):
    value = node.get(key, default) if node is not None else default
    return default if value is None else value


def plan_for(config: DictConfig, cluster: dict[str, Any] | None = None) -> dict[str, Any]:
    """The resources the config needs, the cluster's, whether they fit and, if not, one message."""
    from agent_system.config import EnvConfig
    from recipes.config import env_section

    cluster = cluster or detect_cluster()
    cluster = _logical_on_cpu(config, cluster)
    per_gpu = _verl_cpus_per_gpu()
    trainer = config.trainer
    gpus_per_node, nnodes = int(trainer.n_gpus_per_node), int(trainer.nnodes)
    trainer_gpus = gpus_per_node * nnodes

    reward_model = config.get("reward", {}).get("reward_model", {}) or {}
    reward_gpus = 0
    if _get(reward_model, "enable", False) and _get(reward_model, "enable_resource_pool", False):
        reward_gpus = int(_get(reward_model, "n_gpus_per_node", 0)) * int(_get(reward_model, "nnodes", 0))
    distillation = config.get("distillation") or {}
    teacher_gpus = 0
    if _distillation_enabled(distillation):
        teacher_gpus = int(_get(distillation, "n_gpus_per_node", 0)) * int(_get(distillation, "nnodes", 0))
    critic_enabled = _critic_enabled(config)

    env = EnvConfig.from_dict(env_section(config))
    env_cpu_each = float(env.resources_per_worker.get("num_cpus", 0.5))
    env_gpu_each = float(env.resources_per_worker.get("num_gpus", 0.0))
    env_cpus, env_gpus = env.num_workers * env_cpu_each, env.num_workers * env_gpu_each

    agent_workers = int(config.actor_rollout_ref.rollout.agent.num_workers)
    reward_workers = int(_get(config.get("reward", {}), "num_workers", 0))

    gpus = {
        "trainer_pool": trainer_gpus,
        "critic": 0,  # colocated in the trainer pool by verl 0.9.1's classic TaskRunner
        "reward_model_pool": reward_gpus,
        "teacher_pool": teacher_gpus,
        "env_workers": _num(env_gpus),
    }
    gpus["total"] = _num(sum(gpus.values()))
    pool_gpus = trainer_gpus + reward_gpus + teacher_gpus
    cpus = {
        "trainer_pool": per_gpu * pool_gpus,
        "env_workers": _num(env_cpus),
        "agent_loop_workers": 0,
        "reward_loop_workers": 0,
        "task_runner": 0,
        "scheduling_headroom": _num(SCHEDULING_HEADROOM_CPUS),
    }
    cpus["total"] = _num(sum(cpus.values()))
    details = {
        "trainer_pool": f"{pool_gpus} GPU bundle(s) x {{CPU: {per_gpu}, GPU: 1}} (verl ResourcePoolManager)",
        "critic": "enabled, colocated in the trainer pool" if critic_enabled else "disabled",
        "env_workers": f"{env.num_workers} AFlowWorker x {{num_cpus: {_fmt(env_cpu_each)}, num_gpus: "
                       f"{_fmt(env_gpu_each)}}} (env.num_workers, env.resources_per_worker)",
        "agent_loop_workers": f"{agent_workers} AgentLoopWorker (Ray default: 1 CPU to schedule, 0 held)",
        "reward_loop_workers": f"{reward_workers} RewardLoopWorker (Ray default: 1 CPU to schedule, 0 held)",
        "task_runner": "verl TaskRunner, bare @ray.remote (1 CPU to schedule, 0 held)",
        "scheduling_headroom": "one free CPU for the actors above to be created",
    }
    message = _refusal(config, gpus, cpus, cluster, env, env_cpu_each, env_gpu_each, per_gpu)
    memory = memory_for(config, cluster)
    message = message or memory.get("message")
    if str(config.trainer.get("device", "cuda")) == "cuda" and cluster.get("nvidia_driver"):
        message = message or driver_refusal(cluster["nvidia_driver"], torch_cuda())
    return {"gpus": gpus, "cpus": cpus, "details": details, "memory": memory,
            "cluster": {k: cluster[k] for k in ("source", "cpus", "gpus", "node_gpus", "gpu_memory_gb",
                                                "host_memory_gb", "nvidia_driver") if k in cluster},
            "fits": message is None, "message": message}


def memory_for(config: DictConfig, cluster: dict[str, Any]) -> dict[str, Any]:
    """The memory plan (recipes.memory_plan) against the GPU that will run it: the cluster's when it
    was measured, else the one the preset declares (`preflight.gpu_memory_gb`), so a dry run on a
    laptop checks the A100 plan. On trainer.device=cpu there is no GPU to fit."""
    from recipes.memory_plan import DEFAULT_MARGIN, memory_plan

    section = config.get("preflight") or {}
    host_gb = cluster.get("host_memory_gb") or _get(section, "host_memory_gb")  # measured wins
    if str(config.trainer.get("device", "cuda")) == "cpu":
        return memory_plan(config, None, None)  # a CPU run's plan is not the GPU's: nothing to hold it to
    gpu_gb = cluster.get("gpu_memory_gb") or _get(section, "gpu_memory_gb")
    plan = memory_plan(config, float(gpu_gb) if gpu_gb else None, host_gb,
                       float(_get(section, "memory_margin", DEFAULT_MARGIN)))
    if plan.get("message"):
        plan["message"] = f"memory: {plan['message']}"
    return plan


def _logical_on_cpu(config: DictConfig, cluster: dict[str, Any]) -> dict[str, Any]:
    """trainer.device=cpu on this machine: verl starts its own Ray with the logical GPU and CPUs of
    `ray_kwargs.ray_init` (the cpu platform maps the "GPU" to the host's CPU); those are what its
    placement groups are checked against, not the physical count."""
    if str(config.trainer.get("device", "cuda")) != "cpu" or cluster.get("source") != "local machine":
        return cluster
    ray_init = (config.get("ray_kwargs") or {}).get("ray_init") or {}
    gpus = _num(_get(ray_init, "num_gpus", 0))
    cpus = _num(_get(ray_init, "num_cpus", cluster["cpus"]))
    return {**cluster, "gpus": gpus, "cpus": cpus, "node_gpus": [gpus],
            "source": f"local machine, CPU only: Ray's logical resources from ray_kwargs.ray_init ({cpus} CPUs, "
                      f"{gpus} GPU mapped to the CPU)"}


def _distillation_enabled(section) -> bool:
    try:
        from verl.trainer.distillation import is_distillation_enabled
    except Exception:  # verl missing: read the switch directly
        return bool(_get(section, "enabled", False))
    return bool(is_distillation_enabled(section or None))


def _critic_enabled(config: DictConfig) -> bool:
    enable = config.critic.get("enable")
    if enable is not None:
        return bool(enable)
    return str(config.algorithm.adv_estimator) == "gae"


def _refusal(config, gpus, cpus, cluster, env, env_cpu_each, env_gpu_each, per_gpu) -> str | None:
    trainer = config.trainer
    need_gpus, have_gpus = float(gpus["total"]), float(cluster["gpus"])
    if need_gpus > have_gpus:
        knobs = f"set trainer.n_gpus_per_node (now {trainer.n_gpus_per_node}) x trainer.nnodes (now {trainer.nnodes})"
        if gpus["env_workers"]:
            knobs += f" or env.resources_per_worker.num_gpus ({env.num_workers} x {_fmt(env_gpu_each)} GPU)"
        return f"needs {_fmt(need_gpus)} GPU(s), cluster has {_fmt(have_gpus)}: {knobs}"
    node_gpus = cluster.get("node_gpus") or []
    if node_gpus and int(trainer.n_gpus_per_node) > max(node_gpus):
        return (f"trainer.n_gpus_per_node={trainer.n_gpus_per_node} needs that many GPUs on one node, the "
                f"largest node has {_fmt(max(node_gpus))}: lower trainer.n_gpus_per_node")
    need_cpus, have_cpus = float(cpus["total"]), float(cluster["cpus"])
    if need_cpus > have_cpus:
        deficit = need_cpus - have_cpus
        env_cpus = float(cpus["env_workers"])
        env_knob = (f"env.num_workers ({env.num_workers} x {_fmt(env_cpu_each)} CPU) or "
                    f"env.resources_per_worker.num_cpus")
        head = f"needs {_fmt(need_cpus)} CPUs, cluster has {_fmt(have_cpus)}"
        if env_cpus >= deficit:
            return f"{head}: lower {env_knob}"
        pool = (f"trainer.n_gpus_per_node x trainer.nnodes (verl reserves {per_gpu} CPUs per trainer GPU: "
                f"{_fmt(cpus['trainer_pool'])})")
        if env_cpus > 0:
            return f"{head}: lower {env_knob}, and add CPUs or lower {pool}"
        return f"{head}: add CPUs or lower {pool}"
    return None


def main(argv: list[str] | None = None) -> int:
    from recipes.config import ConfigError, compose, validate_env

    parser = argparse.ArgumentParser(prog="python -m recipes.preflight", description=__doc__.splitlines()[0])
    add_cluster_args(parser)
    parser.add_argument("overrides", nargs="*", help="hydra overrides, e.g. preset=cpu-smoke env.num_workers=8")
    args = parser.parse_args(argv)
    try:
        config = compose(args.overrides)
        validate_env(config)
    except ConfigError as exc:
        print(f"preflight: invalid config: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # hydra composition/override errors
        print(f"preflight: invalid config: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    try:
        plan = plan_for(config, cluster_from_args(args))
    except Exception as exc:  # ray.init to --address failed
        where = f" at {args.address}" if args.address else ""
        print(f"preflight: cannot measure the cluster{where}: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    print(json.dumps(plan, indent=2))
    if not plan["fits"]:
        print(f"preflight: {plan['message']}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
