"""Training entry point: verl's `run_ppo` with the AFlow plugins loaded inside verl's task runner.

    python -m recipes.train [preset=NAME] [hydra overrides...]      # usually through `bash launch.sh`

The config is `configs/aflow_grpo.yaml`: verl's own `ppo_trainer` (found on hydra's search path as
`pkg://verl.trainer.config`) plus the AFlow agent loop, a top-level `env:` section and a preset.
Before anything starts, the config is validated the way `python -m recipes.dry_run` validates it.

`trainer.device=cpu` (preset cpu-local) runs the same verl trainer on a machine without a GPU: verl's CPU
plugin (agent_system/verl_cpu) is loaded here and, through Ray's runtime env, in every worker.

There is one trainer, verl's, on a GPU cluster as on a laptop; `recipes.run_report` adds the per-step
line, the reward plot and summary.json from inside verl's task runner.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib
import json
import os
import shlex
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf, open_dict

from agent_system.policy.checkpoint import RUN_RECORD
from recipes.config import CONFIG_NAME, REPO_ROOT, ConfigError, register_resolvers, validate_env
from recipes.health import RunStopped, read_stopped

# Modules imported inside verl's task-runner process before training starts: the agent loop registers
# "aflow_agent", the advantage hook patches the trainer's advantage step (GiGPO).
PLUGIN_AGENT_LOOP = "agent_system.agent_loop.aflow_agent_loop"
PLUGIN_ADVANTAGE = "agent_system.advantage"
# verl's CPU platform and rollout, imported by verl itself in every process (VERL_USE_EXTERNAL_MODULES)
PLUGIN_VERL_CPU = "agent_system.verl_cpu.plugin"


def _import_plugin(module: str):
    """Import a plugin module; a missing module (or a missing dependency of it) is one clear error."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if missing and (module == missing or module.startswith(missing + ".")):
            raise RuntimeError(
                f"aflow-rl plugin {module!r} is missing from this checkout (it is imported inside verl's "
                f"task runner; the job's working_dir is {os.getcwd()})"
            ) from None
        raise RuntimeError(f"aflow-rl plugin {module!r} cannot be imported: missing module {missing!r}") from exc


def load_plugins(observer=None) -> None:
    """Register the AFlow agent loop and install the advantage hook in THIS process (`observer` sees
    every batch at the advantage step: the run report)."""
    _import_plugin(PLUGIN_AGENT_LOOP)
    advantage = _import_plugin(PLUGIN_ADVANTAGE)
    install = getattr(advantage, "install_advantage_hook", None)
    if install is None:
        raise RuntimeError(f"aflow-rl plugin {PLUGIN_ADVANTAGE!r} has no install_advantage_hook()")
    install(observer=observer)


def portable_paths(config: DictConfig) -> None:
    """Resolve the config, then make the agent-loop YAML path relative to the cwd when it lies under it.

    Inside a Ray job every worker's cwd is its node's copy of the job's working_dir, and verl's
    `resolve_config_path` tries the cwd first, so a relative path works on every node, where the
    absolute path of one node's copy would not.
    """
    OmegaConf.resolve(config)
    agent = config.actor_rollout_ref.rollout.agent
    path = agent.get("agent_loop_config_path")
    if path and os.path.isabs(path):
        cwd = os.path.abspath(os.getcwd())
        if os.path.abspath(path).startswith(cwd + os.sep):
            agent.agent_loop_config_path = os.path.relpath(path, cwd)


def task_runner_class():
    """A Ray actor class: verl's classic TaskRunner whose run() first loads the AFlow plugins.

    verl declares `TaskRunner` with a bare `@ray.remote` (in verl.trainer.main_ppo_v0) and `run_ppo`
    calls `task_runner_class.remote()` then `.run.remote(config)`. Ray forbids subclassing an actor
    class, so the subclass derives from the plain class Ray keeps as `__ray_actor_class__` and is made
    an actor again with the same bare `ray.remote`.
    """
    import ray
    from verl.trainer.main_ppo_v0 import TaskRunner

    base = getattr(TaskRunner, "__ray_actor_class__", None)
    if not isinstance(base, type):
        raise RuntimeError("verl.trainer.main_ppo_v0.TaskRunner is not a Ray actor class as expected")

    class AFlowTaskRunner(base):
        def run(self, config):
            from recipes.run_report import RunReport

            register_resolvers()
            hooks = RunHooks(config)
            report = RunReport(config.trainer.default_local_dir, on_step=hooks.on_step)
            load_plugins(observer=report.on_batch)
            report.watch()
            hooks.install()
            portable_paths(config)
            with embedded_executor(config):
                result = super().run(config)
            summary = report.finish()
            if summary["checkpoint"]:
                print(f"search with the trained policy: {policy_command(hooks.run_record, summary['checkpoint'])}",
                      flush=True)
            return result

    return ray.remote(AFlowTaskRunner)


class RunHooks:
    """What the run adds to verl's RayPPOTrainer, in the task runner (the process that runs `fit`): the
    environment's directory saved with each checkpoint and restored on resume (recipes/env_state.py), and
    the health guard (recipes/health.py), which saves a checkpoint and stops the run."""

    def __init__(self, config: DictConfig):
        from recipes.health import HealthGuard

        self.out_dir = Path(config.trainer.default_local_dir)
        self.env_dir = Path(config.env.workdir)
        self.guard = HealthGuard.of(config.env.health)
        self.run_record = run_record(config)
        self.trainer = None
        self.saved_step: int | None = None

    def install(self) -> None:
        """Wrap RayPPOTrainer's fit, checkpoint save and load, and the agent-loop manager's generation, in this
        process. A wrapper keeps the function it wraps as `_aflow_original`: installing again wraps that."""
        from verl.experimental.agent_loop.agent_loop import AgentLoopManager
        from verl.trainer.ppo.ray_trainer import RayPPOTrainer

        hooks = self

        def original(cls, name: str):
            current = getattr(cls, name)
            return getattr(current, "_aflow_original", current)

        fit, save, load = (original(RayPPOTrainer, name) for name in ("fit", "_save_checkpoint", "_load_checkpoint"))
        generate = original(AgentLoopManager, "generate_sequences")

        def fit_(trainer):
            hooks.trainer = trainer
            return fit(trainer)

        def save_(trainer):
            from recipes import env_state

            save(trainer)
            step_dir = hooks.out_dir / f"global_step_{trainer.global_steps}"
            (step_dir / RUN_RECORD).write_text(json.dumps(hooks.run_record, indent=1))
            env_state.snapshot(hooks.env_dir, step_dir)
            env_state.prune(hooks.out_dir)
            hooks.saved_step = trainer.global_steps

        def load_(trainer):
            from recipes import env_state

            result = load(trainer)
            step = int(trainer.global_steps or 0)
            print(env_state.restore(hooks.out_dir / f"global_step_{step}" if step else None, hooks.env_dir),
                  flush=True)
            return result

        def generate_(manager, prompts):
            output = generate(manager, prompts)  # verl's auto_await: synchronous when called from fit
            if not prompts.meta_info.get("validate"):
                hooks.on_rollout(output)
            return output

        for cls, name, wrapper, wrapped in ((RayPPOTrainer, "fit", fit_, fit),
                                            (RayPPOTrainer, "_save_checkpoint", save_, save),
                                            (RayPPOTrainer, "_load_checkpoint", load_, load),
                                            (AgentLoopManager, "generate_sequences", generate_, generate)):
            functools.update_wrapper(wrapper, wrapped)
            wrapper._aflow_original = wrapped
            setattr(cls, name, wrapper)

    def on_rollout(self, output) -> None:
        """A training batch in which every episode failed has no token to train on (verl's rollout correction
        raises on it, deep in the step): stop here, with a checkpoint and the episodes' reasons."""
        if self.trainer is None or float(output.batch["response_mask"].sum()) > 0:
            return
        reasons = sorted({str(r) for r in output.non_tensor_batch.get("episode_failed", []) if r})
        step = int(self.trainer.global_steps)
        self.stop(step, f"every episode of step {step} failed ({len(output)} episodes): there is nothing to train "
                        f"on{f'; e.g. {reasons[0]}' if reasons else ''}")

    def on_step(self, step: int, counts: dict) -> None:
        reason = self.guard.check(step, counts)
        if reason is not None:
            self.stop(step, reason)

    def stop(self, step: int, reason: str) -> None:
        from recipes.health import write_stopped

        checkpoint = None
        if self.trainer is not None:
            if self.saved_step != step:
                self.trainer._save_checkpoint()
            checkpoint = str(self.out_dir / f"global_step_{step}")
        write_stopped(self.out_dir, step, reason, checkpoint)
        print(f"health guard: stopping the run: {reason} (checkpoint: {checkpoint})", flush=True)
        raise RunStopped(reason)


def run_record(config: DictConfig) -> dict:
    """What a checkpoint's policy was trained for (global_step_N/aflow_run.json): `aflow policy` serves it with
    the run's action space, and the command printed at the end searches the run's benchmark with it."""
    from aflow.benchmarks import resolve_data_dir
    from agent_system.config import EnvConfig
    from recipes.checks import needed_splits

    env = EnvConfig.from_dict(OmegaConf.to_container(config.env, resolve=True))
    try:
        benchmarks = sorted(b for b in needed_splits(config, env) if b)
    except Exception:  # noqa: BLE001 -- a record without benchmarks still serves the policy
        benchmarks = []
    data_dir = resolve_data_dir(env.data_dir)
    model_path = OmegaConf.select(config, "actor_rollout_ref.model.path", default=None)
    return {"model_path": str(model_path) if model_path else None, "action_space": env.action_space,
            "mode": env.mode, "benchmarks": benchmarks, "data_dir": str(data_dir) if data_dir else None,
            "experiment": str(OmegaConf.select(config, "trainer.experiment_name", default=""))}


def policy_command(record: dict, checkpoint: str) -> str:
    """`aflow optimize` with the checkpoint as its optimizer, on the run's (first) benchmark."""
    benchmark = (record.get("benchmarks") or ["gsm8k"])[0]
    workspace = Path(checkpoint).parent / f"search-{benchmark}-{Path(checkpoint).name}"
    parts = ["aflow", "optimize", "--benchmark", benchmark, "--action-space", record.get("action_space", "code"),
             "--optimizer-policy", checkpoint, "--workspace", str(workspace), "--rounds", "10"]
    if record.get("data_dir"):
        parts += ["--data-dir", record["data_dir"]]
    return " ".join(shlex.quote(p) for p in parts)


@contextlib.contextmanager
def embedded_executor(config: DictConfig):
    """The embedded llama.cpp executor for the run when `env.executor.base_url` is empty.

    Started inside verl's task runner, which outlives every AFlowWorker; its URL is written into the
    config that the task runner hands to the agent-loop workers, which pass `env:` to the AFlowWorkers.
    It listens on 127.0.0.1, so a cluster of several nodes is refused: AFlowWorkers elsewhere could not
    reach it (and without an executor every episode would fail and the run would train on nothing).
    """
    from agent_system.config import EMBEDDED_EXECUTOR

    executor = config.env.executor
    if str(executor.get("base_url") or "") not in ("", EMBEDDED_EXECUTOR):
        yield None
        return
    import ray

    nodes = [node for node in ray.nodes() if node.get("Alive")]
    if len(nodes) > 1:
        raise RuntimeError(f"env.executor.base_url={EMBEDDED_EXECUTOR!r}: the embedded executor serves one machine only, "
                           f"but the cluster has {len(nodes)} nodes: set env.executor.base_url/model")
    from aflow import embedded

    server = embedded.start()
    try:
        with open_dict(config):
            executor.base_url = server.base_url
            executor.model = server.model
        print(f"started the embedded executor at {server.base_url}", flush=True)
        yield server
    finally:
        server.stop()


def cpu_runtime(config: DictConfig) -> None:
    """`trainer.device=cpu`: load verl's CPU plugin here and in every Ray worker, through Ray's runtime env.

    The plugin must be importable before verl selects a platform: in this process it is imported now (verl
    has not resolved its platform yet), in the workers by verl's own `__init__` from
    VERL_USE_EXTERNAL_MODULES. On a local cluster (no RAY_ADDRESS) verl starts Ray without a working_dir,
    so the workers find this checkout through PYTHONPATH; inside a Ray job the job's working_dir does that.
    Also resolves `actor_rollout_ref.model.path: embedded` to the converted HF directory the workers load.
    """
    from agent_system.policy_model import policy_directory

    modules = [m for m in os.environ.get("VERL_USE_EXTERNAL_MODULES", "").split(",") if m]
    env_vars = {
        "VERL_USE_EXTERNAL_MODULES": ",".join(dict.fromkeys([*modules, PLUGIN_VERL_CPU])),
        "VERL_PLATFORM": "cpu",
    }
    if not os.environ.get("RAY_ADDRESS"):
        paths = [str(REPO_ROOT), *os.environ.get("PYTHONPATH", "").split(os.pathsep)]
        env_vars["PYTHONPATH"] = os.pathsep.join(p for p in dict.fromkeys(paths) if p)
    os.environ.update({k: v for k, v in env_vars.items() if k != "PYTHONPATH"})
    _import_plugin(PLUGIN_VERL_CPU)
    with open_dict(config):
        runtime_env = config.ray_kwargs.ray_init.setdefault("runtime_env", {})
        runtime_env.setdefault("env_vars", {})
        for key, value in env_vars.items():
            runtime_env.env_vars[key] = value
        model = config.actor_rollout_ref.model
        model.path = policy_directory(model.get("path"))


def preflight_in_cluster(config: DictConfig) -> None:
    """Inside a Ray job (RAY_ADDRESS set): refuse a plan the cluster cannot hold, instead of hanging.

    Connects, reads ray.cluster_resources(), disconnects (verl's run_ppo then calls ray.init itself with
    its runtime env). AFLOW_SKIP_PREFLIGHT=1 skips it.
    """
    if os.environ.get("AFLOW_SKIP_PREFLIGHT") == "1" or not os.environ.get("RAY_ADDRESS"):
        return
    import ray

    from recipes.preflight import plan_for

    ray.init(address="auto", logging_level="ERROR", log_to_driver=False)
    try:
        plan = plan_for(config)
    finally:
        ray.shutdown()
    if not plan["fits"]:
        print(f"preflight: {plan['message']}", file=sys.stderr)
        raise SystemExit(3)


def check_isolation(config: DictConfig) -> None:
    """Refuse to train where the sandbox cannot keep answers from reading this node's files (the env
    workers check their own nodes again), unless env.allow_weak_isolation."""
    if config.env.get("allow_weak_isolation", False):
        return
    import asyncio

    from aflow.sandbox import isolation_report
    from agent_system.environments.env_package.aflow.worker import WeakIsolation, refuse_weak_isolation

    try:
        refuse_weak_isolation(asyncio.run(isolation_report()))
    except WeakIsolation as exc:
        raise ConfigError(str(exc)) from None


def run_directories(config: DictConfig) -> None:
    """The run's own environment directory (`env.workdir`, default <trainer.default_local_dir>/env, saved
    with each checkpoint) and a run id that stays the same when the run resumes."""
    out_dir = Path(str(config.trainer.default_local_dir)).expanduser().resolve()
    with open_dict(config):
        config.trainer.default_local_dir = str(out_dir)
        if not config.env.get("workdir"):
            from recipes.env_state import run_env_dir

            config.env.workdir = str(run_env_dir(out_dir))
        if not config.env.get("run_id"):
            config.env.run_id = hashlib.sha256(str(out_dir).encode()).hexdigest()[:12]
    (out_dir / "stopped.json").unlink(missing_ok=True)


def in_ray_job(config: DictConfig) -> None:
    """Inside a Ray job verl's ray.init connects to the job's cluster, where Ray refuses num_cpus/num_gpus
    (they describe a cluster verl would start): those are the head's (launch.sh starts it with them)."""
    if os.environ.get("RAY_ADDRESS"):
        with open_dict(config):
            for key in ("num_cpus", "num_gpus"):
                config.ray_kwargs.ray_init.pop(key, None)


def run(config: DictConfig) -> None:
    """Check, then train with verl's RayPPOTrainer."""
    from recipes import checks
    from recipes.dry_run import validate

    env = validate_env(config)
    checks.check_executor_choice(config, env)
    if str(config.trainer.get("device", "cuda")) == "cpu":
        cpu_runtime(config)  # before verl's trainer modules are imported: importing them selects the platform
    from verl.trainer.main_ppo import run_ppo
    from verl.utils.device import auto_set_device

    auto_set_device(config)  # as verl's own main does: trainer.device=npu on Ascend
    validate(config)
    run_directories(config)
    aflow_episodes = config.actor_rollout_ref.rollout.agent.get("default_agent_loop") == "aflow_agent"
    if aflow_episodes:  # another agent loop (tests/toy_task.py) runs no AFlow environment
        checks.check_data(config, env)
    check_isolation(config)
    preflight_in_cluster(config)
    if aflow_episodes:
        checks.probe_executor(env)
    in_ray_job(config)
    try:
        run_ppo(config, task_runner_class=task_runner_class())
    except Exception:
        stopped = read_stopped(Path(config.trainer.default_local_dir))
        if stopped is None:
            raise
        raise RunStopped(f"{stopped['reason']} (checkpoint: {stopped['checkpoint']})") from None


@hydra.main(config_path="../configs", config_name=CONFIG_NAME, version_base=None)
def main(config: DictConfig) -> None:
    try:
        run(config)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except RunStopped as exc:
        print(f"training stopped by the health guard: {exc}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
