"""The user's config file: endpoints and the data directory, so they are not flags on every call.

    # ~/.config/aflow/config.toml   (or --config FILE, or $AFLOW_CONFIG)
    data_dir = "~/aflow-data"

    [executor]
    base_url = "https://api.openai.com/v1"
    model = "gpt-4o-mini"
    api_key_env = "OPENAI_API_KEY"     # the variable that holds the key

    [optimizer]                        # and [value], for --value-provider model
    base_url = "http://127.0.0.1:8000/v1"
    model = "my-trained-policy"

Precedence, per role: the command line, then the AFLOW_<ROLE>_BASE_URL/_MODEL variables, then this
file, then the embedded server. A role set on the command line or in the environment takes nothing
from the file, so a URL and a model from two places are never mixed. Keys are never read from the
file: a file is easily committed or shared, so it names the variable instead (`api_key: ...` is
refused with a line saying so). Unknown sections and keys are refused too: a typo must not
silently fall back to the embedded server.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROLES = ("executor", "optimizer", "value")
ROLE_KEYS = ("base_url", "model", "api_key_env")
TOP_KEYS = ("data_dir",)


class UserConfigError(RuntimeError):
    """The config file cannot be read or says something this version does not understand."""


@dataclass
class UserConfig:
    path: Path | None = None
    data_dir: str | None = None
    endpoints: dict[str, dict[str, str]] = field(default_factory=dict)


def default_path() -> Path:
    root = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(root) / "aflow" / "config.toml"


def find(explicit: str | None) -> Path | None:
    """--config FILE, else $AFLOW_CONFIG, else the default path when it exists. A file named
    explicitly (flag or variable) must exist."""
    named = explicit or os.environ.get("AFLOW_CONFIG")
    if named:
        path = Path(named).expanduser()
        if not path.is_file():
            source = "--config" if explicit else "$AFLOW_CONFIG"
            raise UserConfigError(f"config file {path} (from {source}) does not exist")
        return path
    path = default_path()
    return path if path.is_file() else None


def load(explicit: str | None = None) -> UserConfig:
    path = find(explicit)
    if path is None:
        return UserConfig()
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise UserConfigError(f"config file {path} cannot be read: {' '.join(str(exc).split())}") from exc
    config = UserConfig(path=path)
    for key, value in raw.items():
        if key in ROLES:
            if not isinstance(value, dict):
                raise UserConfigError(f"config file {path}: [{key}] must be a table")
            config.endpoints[key] = _role(path, key, value)
        elif key in TOP_KEYS:
            if not isinstance(value, str) or not value:
                raise UserConfigError(f"config file {path}: {key} must be a non-empty string")
            config.data_dir = value
        else:
            raise UserConfigError(f"config file {path}: unknown key {key!r} (known: {', '.join(TOP_KEYS + ROLES)})")
    return config


def _role(path: Path, role: str, table: dict) -> dict[str, str]:
    for key, value in table.items():
        if key in ("api_key", "key", "token"):
            raise UserConfigError(f"config file {path}: [{role}] {key} - keys are not read from files; put the key "
                                  f"in an environment variable and name it with api_key_env")
        if key not in ROLE_KEYS:
            raise UserConfigError(f"config file {path}: [{role}] unknown key {key!r} (known: {', '.join(ROLE_KEYS)})")
        if not isinstance(value, str) or not value:
            raise UserConfigError(f"config file {path}: [{role}] {key} must be a non-empty string")
    if "base_url" not in table or "model" not in table:
        raise UserConfigError(f"config file {path}: [{role}] needs both base_url and model")
    return dict(table)
