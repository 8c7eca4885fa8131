"""The training config (configs/aflow_grpo.yaml on verl's ppo_trainer), its presets, the dry run and the
resource preflight. CPU only: nothing here starts Ray or a model."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("verl")
pytest.importorskip("hydra")

from omegaconf import OmegaConf  # noqa: E402

from agent_system.config import EnvConfig  # noqa: E402
from recipes import config as config_module  # noqa: E402
from recipes import dry_run, preflight, train  # noqa: E402
from recipes.config import CONFIG_DIR, ConfigError, compose  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # verl's "engine X is not available" at import

ROOT = Path(__file__).resolve().parent.parent
PRESETS = sorted(p.stem for p in (CONFIG_DIR / "preset").glob("*.yaml"))
AGENT_LOOP_TARGET = "agent_system.agent_loop.aflow_agent_loop.AFlowAgentLoop"


def _env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["AFLOW_RUNS_DIR"] = str(tmp_path / "runs")
    env.pop("RAY_ADDRESS", None)
    return env


def test_presets_are_the_documented_five():
    """configs/preset holds exactly the presets of the README's `preset=` table, one row each."""
    readme = (ROOT / "README.md").read_text().split("| `preset=` | for |\n|---|---|\n", 1)[1]
    rows = readme.split("\n\n", 1)[0].splitlines()
    documented = [row.split("`")[1] for row in rows]
    assert len(documented) == 5 and set(documented) == set(PRESETS)
    assert set(PRESETS) == {"qwen2.5-7b-a100-80g", "qwen2.5-7b-a100-40g-lora", "cpu-smoke", "cpu-local",
                            "cpu-rehearsal"}


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_composes_and_passes_verl_validation(preset):
    config = compose([f"preset={preset}"])
    notes = dry_run.validate(config)  # raises ConfigError when verl (or EnvConfig) rejects the config
    assert all(isinstance(n, str) for n in notes)
    assert config.algorithm.adv_estimator == "grpo"
    assert config.trainer.use_v1 is False
    rollout = config.actor_rollout_ref.rollout
    # cpu-local, cpu-rehearsal: verl's trainer on the CPU, with the project's `cpu` rollout (agent_system/verl_cpu)
    assert rollout.name == ("cpu" if preset in ("cpu-local", "cpu-rehearsal") else "vllm") and rollout.mode == "async"
    assert rollout.agent.default_agent_loop == "aflow_agent"
    assert config.data.return_raw_chat is True
    path = Path(rollout.agent.agent_loop_config_path)
    assert path.is_absolute() and path.is_file()
    entries = OmegaConf.to_container(OmegaConf.load(path))
    assert {"name": "aflow_agent", "_target_": AGENT_LOOP_TARGET} in entries
    EnvConfig.from_dict(config_module.env_section(config))
    # every episode batch splits evenly among the agent-loop workers (verl's DataProto.chunk needs it)
    assert (config.data.train_batch_size * rollout.n) % rollout.agent.num_workers == 0


def test_default_preset_is_a100_80g():
    config = compose([])
    assert config.actor_rollout_ref.model.path == "Qwen/Qwen2.5-7B-Instruct"
    assert config.trainer.n_gpus_per_node == 1 and config.trainer.nnodes == 1
    assert config.actor_rollout_ref.model.enable_gradient_checkpointing is True
    assert config.actor_rollout_ref.rollout.n == 8
    assert config.actor_rollout_ref.rollout.tensor_model_parallel_size == 1
    assert config.actor_rollout_ref.actor.use_kl_loss is True
    assert config.actor_rollout_ref.model.lora_rank == 0


def test_lora_preset():
    config = compose(["preset=qwen2.5-7b-a100-40g-lora"])
    model = config.actor_rollout_ref.model
    assert model.lora_rank == 64 and model.lora_alpha == 128
    assert list(model.target_modules) == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert config.actor_rollout_ref.rollout.load_format == "safetensors"
    assert config.data.train_batch_size < compose([]).data.train_batch_size


def test_cpu_smoke_is_tiny():
    config = compose(["preset=cpu-smoke"])
    assert config.actor_rollout_ref.rollout.n == 2
    assert config.data.train_batch_size == 2
    assert config.data.max_prompt_length <= 512 and config.data.max_response_length <= 512
    assert "SmolLM2" in config.actor_rollout_ref.model.path


def test_env_defaults_come_from_envconfig_alone(monkeypatch):
    """One definition of the env defaults: the dataclass, registered as hydra's `env: aflow_env`; the
    YAML sets only what must differ (the data directory from the environment)."""
    monkeypatch.delenv("AFLOW_DATA_DIR", raising=False)
    yaml_env = OmegaConf.load(CONFIG_DIR / "aflow_grpo.yaml").env
    assert set(yaml_env) == {"data_dir"}, "configs/aflow_grpo.yaml must not copy EnvConfig's defaults"
    section = config_module.env_section(compose([]))
    preset = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "preset" / "qwen2.5-7b-a100-80g.yaml").env)
    assert EnvConfig.from_dict(section).to_dict() == {**EnvConfig().to_dict(), **preset}  # the rest: the dataclass


@pytest.mark.parametrize("override,fragment", [("env.max_turns=three", "max_turns"), ("+env.bogus=1", "bogus"),
                                               ("env.reward.format_penalty=high", "format_penalty")])
def test_env_keys_and_types_are_checked(override, fragment):
    """Types fail when composing (the schema); a key forced in with `+` fails in validation."""
    with pytest.raises(ConfigError, match=fragment):
        dry_run.validate(dry_run.compose_checked(["preset=cpu-smoke", override]))


def test_agent_loop_path_resolves_from_any_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = compose(["preset=cpu-smoke"])
    assert Path(config.actor_rollout_ref.rollout.agent.agent_loop_config_path) == CONFIG_DIR / "agent_loop.yaml"


def test_unknown_algorithm_key_is_rejected_by_verl():
    # hydra already refuses a key that is not in the composed config ...
    with pytest.raises(ConfigError, match="algorithm.foo"):
        dry_run.compose_checked(["algorithm.foo=1"])
    # ... and a forced one (+) is refused by verl's AlgoConfig through omega_conf_to_dataclass
    config = compose(["+algorithm.foo=1"])
    with pytest.raises(ConfigError, match=r"^algorithm: .*AlgoConfig.*foo"):
        dry_run.validate(config)


def test_unknown_actor_key_and_bad_batch_sizes_are_rejected_by_verl():
    with pytest.raises(ConfigError, match=r"^actor_rollout_ref\.actor: .*FSDPActorConfig"):
        dry_run.validate(compose(["+actor_rollout_ref.actor.bogus=2"]))
    with pytest.raises(ConfigError, match=r"^verl validate_config: .*ppo_mini_batch_size"):
        dry_run.validate(compose(["actor_rollout_ref.actor.ppo_mini_batch_size=16"]))


def test_bad_env_key_is_rejected():
    with pytest.raises(ValueError, match="bogus"):
        EnvConfig.from_dict({"bogus": 1})
    with pytest.raises(ConfigError, match="env.mode"):
        dry_run.validate(compose(["preset=cpu-smoke", "env.mode=nope"]))


def test_aflow_checks():
    with pytest.raises(ConfigError, match="agent.num_workers=3"):
        dry_run.validate(compose(["actor_rollout_ref.rollout.agent.num_workers=3"]))
    with pytest.raises(ConfigError, match="tensor_model_parallel_size=2"):
        dry_run.validate(compose(["actor_rollout_ref.rollout.tensor_model_parallel_size=2"]))
    with pytest.raises(ConfigError, match="use_v1"):
        dry_run.validate(compose(["trainer.use_v1=true"]))


def test_there_is_one_trainer():
    """The home-made CPU trainer is retired: no backend switch is left to pick it, and the CPU preset is
    verl's trainer on the cpu platform."""
    config = compose(["preset=cpu-local"])
    assert "backend" not in config.trainer
    assert config.trainer.device == "cpu" and config.actor_rollout_ref.rollout.name == "cpu"


def test_dry_run_main_exit_codes(capsys):
    assert dry_run.main(["--cluster-cpus", "8", "--cluster-gpus", "1", "preset=cpu-smoke"]) == 0
    out = capsys.readouterr().out
    assert "# resource plan" in out and "resource plan fits" in out
    assert dry_run.main(["--cluster-cpus", "8", "--cluster-gpus", "0", "preset=cpu-smoke"]) == 0
    assert "does not fit" in capsys.readouterr().out
    assert dry_run.main(["--strict", "--cluster-cpus", "8", "--cluster-gpus", "0", "preset=cpu-smoke"]) == 3
    assert "trainer.n_gpus_per_node" in capsys.readouterr().err
    assert dry_run.main(["+algorithm.foo=1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dry run: invalid config: algorithm:")


def _plan(overrides, cpus, gpus):
    return preflight.plan_for(compose(overrides), {"source": "test", "cpus": cpus, "gpus": gpus, "node_gpus": [gpus]})


def test_preflight_plan_counts():
    plan = _plan(["preset=cpu-smoke"], 16, 1)
    assert plan["fits"] and plan["message"] is None
    assert plan["gpus"]["total"] == 1
    # verl's GPU bundle {CPU: 3, GPU: 1} + 1 env worker x 0.5 + one CPU of scheduling headroom
    assert plan["cpus"]["trainer_pool"] == 3 and plan["cpus"]["env_workers"] == 0.5
    assert plan["cpus"]["total"] == 4.5


def test_preflight_refuses_gpu_plan_on_cpu_cluster():
    plan = _plan(["preset=cpu-smoke"], 16, 0)
    assert not plan["fits"]
    assert plan["message"].startswith("needs 1 GPU(s), cluster has 0: set trainer.n_gpus_per_node")


def test_preflight_refuses_env_workers_taking_every_cpu():
    plan = _plan(["preset=cpu-smoke", "env.num_workers=8", "env.resources_per_worker.num_cpus=1"], 4, 1)
    assert not plan["fits"]
    assert "cluster has 4" in plan["message"] and "env.num_workers (8 x 1 CPU)" in plan["message"]


def test_preflight_cli(tmp_path):
    base = [sys.executable, "-m", "recipes.preflight", "--cluster-cpus", "4", "--cluster-gpus"]
    gpu = subprocess.run(base + ["0", "preset=cpu-smoke"], cwd=tmp_path, env=_env(tmp_path),
                         capture_output=True, text=True, timeout=300)
    assert gpu.returncode == 3, gpu.stderr
    assert '"fits": false' in gpu.stdout
    assert gpu.stderr.strip().splitlines()[-1].startswith("preflight: needs 1 GPU(s), cluster has 0: set trainer.n_gpus_per_node")
    cpu = subprocess.run(base + ["1", "preset=cpu-smoke", "env.num_workers=8", "env.resources_per_worker.num_cpus=1"],
                         cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert cpu.returncode == 3, cpu.stderr
    assert "lower env.num_workers (8 x 1 CPU)" in cpu.stderr.strip().splitlines()[-1]


def test_dry_run_module_from_another_cwd(tmp_path):
    result = subprocess.run([sys.executable, "-m", "recipes.dry_run", "preset=cpu-smoke"], cwd=tmp_path,
                            env=_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "# composed config (resolved)" in result.stdout and "# resource plan" in result.stdout
    assert "adv_estimator: grpo" in result.stdout
    assert result.stdout.strip().splitlines()[-1].startswith("dry run: config valid; resource plan")


def test_launch_sh_dry_run(tmp_path):
    result = subprocess.run(["bash", str(ROOT / "launch.sh"), "--dry-run", "preset=cpu-smoke"], cwd=tmp_path,
                            env=_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "# resource plan" in result.stdout and '"cpus"' in result.stdout
    assert "dry run: config valid" in result.stdout


def test_launch_sh_dry_run_invalid_is_exit_2(tmp_path):
    result = subprocess.run(["bash", str(ROOT / "launch.sh"), "--dry-run", "preset=cpu-smoke", "env.num_workers=oops"],
                            cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("dry run: invalid config:")


def test_task_runner_subclasses_verl_task_runner():
    from verl.trainer.main_ppo_v0 import TaskRunner

    runner = train.task_runner_class()
    cls = runner.__ray_actor_class__
    assert issubclass(cls, TaskRunner.__ray_actor_class__)
    assert cls.run is not TaskRunner.__ray_actor_class__.run


def test_plugin_guard_names_the_missing_module(monkeypatch):
    monkeypatch.setattr(train, "PLUGIN_ADVANTAGE", "agent_system.no_such_plugin")
    monkeypatch.setattr(train, "PLUGIN_AGENT_LOOP", "agent_system.config")
    with pytest.raises(RuntimeError, match=r"plugin 'agent_system.no_such_plugin' is missing"):
        train.load_plugins()


def test_portable_paths_relative_inside_working_dir(monkeypatch):
    monkeypatch.chdir(ROOT)
    config = compose(["preset=cpu-smoke"])
    train.portable_paths(config)
    assert config.actor_rollout_ref.rollout.agent.agent_loop_config_path == "configs/agent_loop.yaml"


@pytest.mark.parametrize("overrides,critic", [
    (["algorithm.adv_estimator=workflow_gigpo"], False),
    (["algorithm.adv_estimator=gae", "critic.enable=true"], True),
])
def test_other_estimators_compose_and_validate(overrides, critic):
    """workflow-GiGPO (our hook) and the critic path (gae) are options of the same config."""
    from verl.trainer.ppo.utils import need_critic

    from agent_system.advantage import register_estimator

    register_estimator()  # as the task runner does before training
    if critic:  # verl builds the critic's model config (tokenizer included): point it at a local model
        from agent_system.policy_model import ensure_default_converted

        overrides = [*overrides, f"critic.model.path={ensure_default_converted()}", "critic.ppo_micro_batch_size_per_gpu=1"]
    config = compose(["preset=cpu-smoke", *overrides])
    dry_run.validate(config)
    assert config.algorithm.adv_estimator == overrides[0].split("=")[1]
    assert need_critic(config) is critic


@pytest.mark.ray  # a real local Ray head
@pytest.mark.fit  # `bash launch.sh` of the real job (its preflight refuses it)
def test_launch_refuses_a_plan_the_real_cluster_cannot_fit(tmp_path):
    """A real local Ray head (no GPU): `bash launch.sh` must refuse at once with one message and
    submit no job, instead of letting the trainer wait forever for resources."""
    from tests.fits import ray_head

    env = {**_env(tmp_path), "RAY_AUTH_MODE": "token"}
    with ray_head(env, "--num-cpus", "2", "--num-gpus", "0") as (address, _, _):
        launch = subprocess.run(["bash", str(ROOT / "launch.sh"), "preset=cpu-smoke"], cwd=tmp_path,
                                capture_output=True, text=True, env={**env, "RAY_ADDRESS": address}, timeout=300)
    assert launch.returncode == 3, launch.stdout[-1500:] + launch.stderr[-1500:]
    refusal = [line for line in launch.stderr.splitlines() if "trainer.n_gpus_per_node" in line]
    assert len(refusal) == 1 and "GPU" in refusal[0]
    assert "submitting" not in launch.stdout + launch.stderr
