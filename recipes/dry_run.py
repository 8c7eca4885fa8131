"""Compose and validate the training config with verl's own config classes; print it and the resource plan.

    python -m recipes.dry_run [--strict] [--address ADDR] [--cluster-cpus N] [--cluster-gpus G] [overrides...]
    bash launch.sh --dry-run [--strict] [overrides...]

Starts no workers and needs no GPU. Prints the composed config (YAML, resolved), the resource plan
(JSON, see recipes/preflight.py) and a verdict line. Exit status: 0 when the config is valid (whether
or not the plan fits, unless --strict), 2 with a one-line error when it is not, 3 with --strict when
the plan does not fit.

What `validate` checks, in order (every verl call is verl's own code, nothing re-implemented):
  1. `env:` through `agent_system.config.EnvConfig.from_dict` (its schema already checked when composing).
  2. `verl.utils.config.omega_conf_to_dataclass` on each section verl turns into a dataclass:
     algorithm (AlgoConfig), actor_rollout_ref.actor (FSDPActorConfig), actor_rollout_ref.rollout
     (RolloutConfig, with agent/multi_turn/checkpoint_engine/...), critic (CriticConfig, when verl
     needs a critic), distillation (when enabled), skip (SkipManagerConfig). Unknown keys, wrong types and the dataclasses' __post_init__ checks fail here.
  3. actor_rollout_ref.model merged onto `OmegaConf.structured(HFModelConfig)`: keys and types only.
     Instantiating HFModelConfig would download/load the tokenizer and HF config from the model path.
  4. `verl.utils.config.validate_config(config, use_reference_policy=need_reference_policy(config),
     use_critic=need_critic(config))`, the function verl's main_ppo and TaskRunner call (batch-size
     divisibility, micro-batch settings, actor.validate, critic.validate, LoRA rank vs vLLM). Its LoRA
     check imports vLLM; where vLLM is not installed (CPU machines) that one check is reported as
     skipped and the rest runs on a copy with the LoRA rank set to 0.
  5. aflow-rl checks verl does only at run time: the agent-loop YAML exists and registers the default
     agent loop with a `_target_`, train_batch_size x rollout.n divides among the agent-loop workers,
     rollout tensor parallelism divides the GPUs, trainer.use_v1 is false (recipes.train drives the
     classic trainer).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from recipes.config import ConfigError, compose, validate_env

AGENT_LOOP_NAME = "aflow_agent"


def _one_line(exc: BaseException) -> str:
    text = " ".join(part.strip() for part in str(exc).splitlines() if part.strip())
    return text or type(exc).__name__


def _convert(section: str, node, dataclass_type=None):
    """verl's omega_conf_to_dataclass on one section; any failure is a ConfigError naming the section."""
    from verl.utils.config import omega_conf_to_dataclass

    try:
        return omega_conf_to_dataclass(node, dataclass_type)
    except Exception as exc:  # hydra/omegaconf/dataclass errors of many types: report them as one line
        raise ConfigError(f"{section}: {_one_line(exc)}") from None


def _vllm_installed() -> bool:
    return importlib.util.find_spec("vllm") is not None


def _lora_rank(config: DictConfig) -> int:
    model = config.actor_rollout_ref.model
    rank = int(model.get("lora", {}).get("rank", 0) or 0)
    return rank if rank > 0 else int(model.get("lora_rank", 0) or 0)


def _verl_sections(config: DictConfig, use_critic: bool) -> None:
    from verl.trainer.distillation import is_distillation_enabled
    from verl.utils.skip import SkipManagerConfig
    from verl.workers.config import HFModelConfig

    _convert("algorithm", config.algorithm)
    _convert("actor_rollout_ref.actor", config.actor_rollout_ref.actor)
    _convert("actor_rollout_ref.rollout", config.actor_rollout_ref.rollout)
    if use_critic:
        _convert("critic", config.critic)
    if is_distillation_enabled(config.get("distillation")):
        _convert("distillation", config.distillation)
    _convert("skip", config.skip, SkipManagerConfig)
    try:
        OmegaConf.merge(OmegaConf.structured(HFModelConfig), config.actor_rollout_ref.model)
    except Exception as exc:
        raise ConfigError(f"actor_rollout_ref.model: {_one_line(exc)}") from None


def _verl_validate_config(config: DictConfig, use_ref: bool, use_critic: bool, notes: list[str]) -> None:
    from verl.utils.config import validate_config

    target = config
    rank = _lora_rank(config)
    lora_merge = bool(config.actor_rollout_ref.model.get("lora", {}).get("merge", False))
    if rank > 0 and not lora_merge and config.actor_rollout_ref.rollout.name == "vllm" and not _vllm_installed():
        target = config.copy()
        with contextlib.suppress(Exception):
            OmegaConf.update(target, "actor_rollout_ref.model.lora_rank", 0, force_add=True)
            OmegaConf.update(target, "actor_rollout_ref.model.lora.rank", 0, force_add=True)
        notes.append(f"LoRA rank {rank} not checked against vLLM's supported ranks: vllm is not installed here")
    try:
        validate_config(config=target, use_reference_policy=use_ref, use_critic=use_critic)
    except Exception as exc:
        raise ConfigError(f"verl validate_config: {_one_line(exc)}") from None


def _aflow_checks(config: DictConfig) -> None:
    if config.trainer.get("use_v1", False):
        raise ConfigError("trainer.use_v1 must be false: recipes.train drives verl's classic RayPPOTrainer")
    rollout = config.actor_rollout_ref.rollout
    agent = rollout.agent
    path = agent.get("agent_loop_config_path")
    if not path:
        raise ConfigError("actor_rollout_ref.rollout.agent.agent_loop_config_path is not set")
    if not Path(path).is_file():
        raise ConfigError(f"actor_rollout_ref.rollout.agent.agent_loop_config_path: no such file {path}")
    entries = OmegaConf.load(path)
    names = {str(e.get("name")): e for e in entries} if isinstance(entries, list) or OmegaConf.is_list(entries) else {}
    default = str(agent.default_agent_loop)
    if default not in names or not names[default].get("_target_"):
        raise ConfigError(f"{path} does not register agent loop {default!r} with a _target_ "
                          f"(rollout.agent.default_agent_loop)")
    episodes = int(config.data.train_batch_size) * int(rollout.n)
    workers = int(agent.num_workers)
    if workers < 1 or episodes % workers:
        raise ConfigError(f"data.train_batch_size x rollout.n = {episodes} episodes do not divide among "
                          f"actor_rollout_ref.rollout.agent.num_workers={workers}")
    gpus = int(config.trainer.n_gpus_per_node) * int(config.trainer.nnodes)
    tp = int(rollout.tensor_model_parallel_size)
    if gpus < 1 or tp < 1 or gpus % tp:
        raise ConfigError(f"actor_rollout_ref.rollout.tensor_model_parallel_size={tp} must divide the "
                          f"{gpus} trainer GPU(s) (trainer.n_gpus_per_node x trainer.nnodes)")


def validate(config: DictConfig) -> list[str]:
    """Validate the composed config; raises ConfigError (one line). Returns notes on skipped checks."""
    from verl.trainer.ppo.utils import need_critic, need_reference_policy

    notes: list[str] = []
    validate_env(config)
    # verl prints progress ("[validate_config] All configuration checks passed") on stdout: keep stdout
    # for the composed config and the plan.
    with contextlib.redirect_stdout(sys.stderr), _quiet_warnings():
        try:
            use_ref = bool(need_reference_policy(config))
            use_critic = bool(need_critic(config))
        except Exception as exc:
            raise ConfigError(_one_line(exc)) from None
        _verl_sections(config, use_critic)
        _verl_validate_config(config, use_ref, use_critic, notes)
    _aflow_checks(config)
    return notes


@contextlib.contextmanager
def _quiet_warnings():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def compose_checked(overrides: list[str]) -> DictConfig:
    try:
        return compose(overrides)
    except Exception as exc:  # hydra override/composition errors
        raise ConfigError(_one_line(exc)) from None


TASK_BENCHMARKS = "gsm8k,math,humaneval,mbpp,hotpotqa,drop"


def ray_head_args(config: DictConfig) -> list[str]:
    """`ray start --head` arguments for a head launch.sh starts: on trainer.device=cpu the logical GPU and
    CPUs of ray_kwargs.ray_init (verl asks for "GPU"; the cpu platform maps it to the host), else none."""
    if str(config.trainer.get("device", "cuda")) != "cpu":
        return []
    init = config.ray_kwargs.get("ray_init") or {}
    return [arg for key in ("num_cpus", "num_gpus") if init.get(key) is not None
            for arg in (f"--{key.replace('_', '-')}", str(init.get(key)))]


def build_missing_task_data(config: DictConfig) -> str | None:
    """Task mode with data.train_files/val_files = DIR/train.parquet, DIR/val.parquet missing: build them
    (data_prep.build, the benchmarks of $AFLOW_BENCHMARKS, else all six; 2 validation rows per benchmark:
    a validation episode costs as much as a training one). Returns what was done, None when nothing."""
    from data_prep.build import main as build

    train, val = Path(str(config.data.train_files)), Path(str(config.data.val_files))
    if str(config.env.mode) != "task" or (train.is_file() and val.is_file()):
        return None
    if train.name != "train.parquet" or val.name != "val.parquet" or train.parent != val.parent:
        return None  # files of the user's own: the data check in recipes.train names what is missing
    benchmarks = os.environ.get("AFLOW_BENCHMARKS") or TASK_BENCHMARKS
    argv = ["--out", str(train.parent), "--benchmarks", benchmarks, "--mode", "task", "--val-task-repeats", "2",
            "--action-space", str(config.env.action_space)]
    if os.environ.get("AFLOW_DATA_DIR"):
        argv += ["--data-dir", os.environ["AFLOW_DATA_DIR"]]
    if build(argv) != 0:
        raise ConfigError(f"data: building the task data in {train.parent} failed (above)")
    return f"built task data ({benchmarks}) in {train.parent}"


def main(argv: list[str] | None = None) -> int:
    from recipes.preflight import add_cluster_args, cluster_from_args, plan_for

    parser = argparse.ArgumentParser(prog="python -m recipes.dry_run", description=__doc__.splitlines()[0])
    parser.add_argument("--strict", action="store_true", help="exit 3 when the resource plan does not fit")
    parser.add_argument("--ray-head-args", action="store_true",
                        help="print the `ray start --head` arguments this config needs, and nothing else")
    parser.add_argument("--build-missing-data", action="store_true",
                        help="build the task-mode parquet when the configured files are missing, then exit")
    add_cluster_args(parser)
    parser.add_argument("overrides", nargs="*", help="hydra overrides, e.g. preset=cpu-smoke data.train_batch_size=4")
    args = parser.parse_args(argv)
    try:
        config = compose_checked(args.overrides)
        if args.ray_head_args:
            print(" ".join(ray_head_args(config)))
            return 0
        if args.build_missing_data:
            done = build_missing_task_data(config)
            if done:
                print(f"[launch] {done}", file=sys.stderr)
            return 0
        notes = validate(config)
        text = OmegaConf.to_yaml(config, resolve=True)
    except ConfigError as exc:
        print(f"dry run: invalid config: {exc}", file=sys.stderr)
        return 2
    try:
        with _quiet_warnings():
            plan = plan_for(config, cluster_from_args(args))
    except Exception as exc:  # ray.init to --address failed
        print(f"dry run: cannot measure the cluster{f' at {args.address}' if args.address else ''}: "
              f"{_one_line(exc)}", file=sys.stderr)
        return 2
    print("# composed config (resolved)")
    print(text.rstrip())
    print("# resource plan")
    print(json.dumps(plan, indent=2))
    for note in notes:
        print(f"dry run: note: {note}")
    verdict = "fits" if plan["fits"] else f"does not fit: {plan['message']}"
    print(f"dry run: config valid; resource plan {verdict}")
    if args.strict and not plan["fits"]:
        print(f"preflight: {plan['message']}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
