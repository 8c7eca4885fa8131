"""The AFlow environment package (verl-agent layout): Ray `AFlowWorker` actors that own a task's
search tree, experience and evaluation cache (worker.py), one episode's rules (episode.py), the
prompts, and `AFlowEnvironmentManager` for the policy-facing text. The agent loop
(agent_system/agent_loop) drives episodes through `worker_handle`; actions are read by the same
projection `aflow optimize` uses (aflow.search.projection)."""

from agent_system.environments.env_package.aflow.worker import AFlowWorker, worker_handle

__all__ = ["AFlowWorker", "worker_handle"]
