"""verl 0.9.1 on a CPU-only machine, through verl's own extension points (no fork, no source edits).

verl imports the modules named in `VERL_USE_EXTERNAL_MODULES` from its own `__init__`, in every process that
imports verl (driver, task runner, FSDP workers, agent-loop and reward workers, rollout servers). Naming
its `plugin` module there (`recipes.train` does it through Ray's runtime env when `trainer.device=cpu`) registers:

* `platform`: a "cpu" platform (select it with `VERL_PLATFORM=cpu`), the FSDP engines for device "cpu",
  the gloo-only process group and the unpinned FSDP2 offload policy;
* `rollout`: the `cpu` rollout (`actor_rollout_ref.rollout.name=cpu`), the project's transformers generation
  backend behind verl's replica/server contract, with weights synced by the checkpoint engine "naive".

Each registration relies on a verl internal of 0.9.1 (tests/test_verl_cpu.py pins them), so any other
verl version is refused with one line rather than failing somewhere inside a Ray worker.

The registrations happen when `agent_system.verl_cpu.plugin` is imported (the module named in
`VERL_USE_EXTERNAL_MODULES`), never as a side effect of importing this package or its other modules: a
process that only reads a class from here (a test, the bench) keeps verl as verl ships it.
"""

from __future__ import annotations

SUPPORTED_VERL = "0.9.1"
MODULE = __name__  # the name the refusal gives


def check_verl_version(version: str | None = None) -> None:
    """Raise one-line RuntimeError unless verl is the version these registrations were written against."""
    if version is None:
        import verl

        version = verl.__version__
    if version != SUPPORTED_VERL:
        raise RuntimeError(f"{MODULE} supports verl {SUPPORTED_VERL} only, found verl {version}: "
                           f"its registrations rely on that release's internals")


# verl first, whichever module of this package a process imports first. In a Ray worker verl's own __init__
# imports the plugin (VERL_USE_EXTERNAL_MODULES), and the plugin imports `platform` and `rollout`: had the
# worker started with `import agent_system.verl_cpu.rollout` (to unpickle its server actor), that module
# would still be half-imported, waiting on verl, when the plugin needs it.
import verl  # noqa: E402,F401
