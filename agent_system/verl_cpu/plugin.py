"""The module verl imports (`VERL_USE_EXTERNAL_MODULES=agent_system.verl_cpu.plugin`): importing it refuses any
verl but 0.9.1 in one line, then registers the `cpu` platform and the `cpu` rollout (see the package docstring).
"""

from agent_system.verl_cpu import check_verl_version

check_verl_version()  # before anything below imports verl's internals

from agent_system.verl_cpu import platform, rollout  # noqa: E402

platform.install()
rollout.install()
