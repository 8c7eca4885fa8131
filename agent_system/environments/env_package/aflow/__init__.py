"""The AFlow environment package (verl-agent layout): Ray `AFlowWorker` actors that own a
task's search tree, experience and evaluation cache; a vectorized `AFlowEnvs`; the shared
`projection`; the prompts; and `AFlowEnvironmentManager` for the policy-facing text."""

from agent_system.environments.env_package.aflow.envs import AFlowEnvs
from agent_system.environments.env_package.aflow.projection import project_actions
from agent_system.environments.env_package.aflow.worker import AFlowWorker, worker_handle

__all__ = ["AFlowEnvs", "AFlowWorker", "project_actions", "worker_handle"]
