"""Composing the training config: the leaf every recipe imports (train, dry_run, preflight), so none
of them imports another to read a config.

`configs/aflow_grpo.yaml` is verl's own `ppo_trainer` (on hydra's search path as
`pkg://verl.trainer.config`) plus the AFlow agent loop, the `env:` section (its schema and defaults:
`agent_system.config.EnvConfig`, registered below) and a preset.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = REPO_ROOT / "configs"
CONFIG_NAME = "aflow_grpo"



class ConfigError(ValueError):
    """A configuration problem, reported as one line."""


def config_path(name: str) -> str:
    """`${aflow_config:NAME}`: the absolute path of configs/NAME next to this package."""
    return str(CONFIG_DIR / str(name))


def register_resolvers() -> None:
    """`${aflow_config:NAME}`, and the `env:` schema: hydra's config store holds `EnvConfig` itself as
    the `env` group's `aflow_env` option (aflow_grpo.yaml's defaults list picks it), so the dataclass
    is the one definition of every env default, and a key or type it does not know fails at compose."""
    from hydra.core.config_store import ConfigStore

    from agent_system.config import EnvConfig

    OmegaConf.register_new_resolver("aflow_config", config_path, replace=True)
    ConfigStore.instance().store(group="env", name="aflow_env", node=EnvConfig)


register_resolvers()


def compose(overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """The composed config (unresolved, struct mode), exactly as `python -m recipes.train` would get it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        return hydra_compose(config_name=CONFIG_NAME, overrides=list(overrides))


def env_section(config: DictConfig) -> dict[str, Any]:
    section = config.get("env")
    if section is None:
        return {}
    return OmegaConf.to_container(section, resolve=True)


def validate_env(config: DictConfig):
    """EnvConfig.from_dict on the `env:` section; any problem becomes a one-line ConfigError."""
    from agent_system.config import EnvConfig

    section = env_section(config)
    try:
        env = EnvConfig.from_dict(section)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"env: {exc}") from None
    # names and types were checked when hydra merged the section onto the EnvConfig schema; from_dict
    # adds the checks a schema cannot express (mode, scoring variant)
    return env
