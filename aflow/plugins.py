"""What the `aflow` command takes from the layers above it, without importing them: the training layer's
policy tools (`aflow policy`, `aflow optimize --optimizer-policy`) through the `aflow.policy` entry point
(pyproject.toml), and the one error type such a plugin raises for a set-up problem, which `aflow` prints as
one line and exit 2."""

from __future__ import annotations

from importlib.metadata import entry_points

POLICY_ENTRY_POINT = "aflow.policy"


class PluginError(RuntimeError):
    """A set-up problem found by a plugin (e.g. a directory that is not a checkpoint); the message is one line."""


def policy_plugin():
    """The policy tools (agent_system.policy): `export`, `serve_forever`, `optimizer_endpoint`."""
    found = list(entry_points(group=POLICY_ENTRY_POINT))
    if not found:
        raise PluginError("a trained policy needs the training layer: install aflow-rl with its `rl` extra "
                          "(pip install -e '.[rl]'; bash launch.sh does)")
    return found[0].load()
