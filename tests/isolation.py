"""The isolation a sandbox run gets on this machine, worked out without asking the sandbox, and
the layers each kind must report in `SandboxResult.isolation` (aflow/sandbox/child.py, `confine`).

  private-root   namespaces (user when not root, mount, network, PID) and a private root holding
                 nothing of the host, read-only but the working directory;
  readonly-host  namespaces, but no private root (child.py knows no pivot_root here): the host's
                 mounts, all read-only but the working directory;
  process-only   no namespaces (none here, `Limits(namespaces=False)`, or AFLOW_SANDBOX_NAMESPACES=0):
                 the job confines itself without privileges: Landlock (reads: the Python prefix
                 without site-packages, the libraries; writes: its directory) and a seccomp filter,
                 with the guard, rlimits and dropped capabilities.

The mode comes from the machine (can a process unshare what the child asks for), so a sandbox
that silently loses a layer fails its tests instead of moving them to a weaker mode's checks.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys

from aflow.sandbox import NAMESPACES_ENV, Limits
from aflow.sandbox.processes import PYTHON

PRIVATE_ROOT, READONLY_HOST, PROCESS_ONLY = "private-root", "readonly-host", "process-only"

# What the child unshares (CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID, plus CLONE_NEWUSER when
# not root), tried by a throwaway interpreter: 0 when the kernel and the container allow it.
_UNSHARE_PROBE = """
import ctypes, os
flags = 0x00020000 | 0x40000000 | 0x20000000 | (0x10000000 if os.geteuid() != 0 else 0)
raise SystemExit(0 if ctypes.CDLL(None, use_errno=True).unshare(flags) == 0 else 1)
"""


@functools.cache
def namespaces_available() -> bool:
    probe = subprocess.run([*PYTHON, "-c", _UNSHARE_PROBE], capture_output=True, timeout=30)
    return probe.returncode == 0


@functools.cache
def machine_mode() -> str:
    """The mode a sandbox run with the default `Limits` must get here."""
    if (not sys.platform.startswith("linux") or not namespaces_available()
            or os.environ.get(NAMESPACES_ENV) == "0"):
        return PROCESS_ONLY
    from aflow.sandbox.child import SYS_PIVOT_ROOT  # the architectures child.py can pivot_root on

    return PRIVATE_ROOT if os.uname().machine in SYS_PIVOT_ROOT else READONLY_HOST


def expected_layers(mode: str, limits: Limits) -> list[str]:
    """The report a run in `mode` must give, in the order the child confines itself."""
    root = os.geteuid() == 0
    layers = [f"pids-cgroup({limits.max_processes})"] if root and os.access("/sys/fs/cgroup/pids", os.W_OK) else []
    if mode != PROCESS_ONLY:
        layers += ([] if root else ["userns"]) + ["netns", "pidns"]
        layers += ["private-root" if mode == PRIVATE_ROOT else "private-root(failed)", "readonly-fs", "private-proc"]
    layers += ["no-capabilities", "rlimits"]
    if mode != PRIVATE_ROOT:  # no private root: the unprivileged layers (aflow/sandbox/unprivileged.py)
        layers += unprivileged_layers()
    return layers + ["guard"]


@functools.cache
def unprivileged_layers() -> list[str]:
    """What Landlock and seccomp give on this kernel and architecture, asked of the kernel directly."""
    from aflow.sandbox import unprivileged

    abi = unprivileged.landlock_abi()
    machine = os.uname().machine
    return [f"landlock(abi {abi})" if abi > 0 else "landlock(unavailable)",
            "seccomp" if machine == "x86_64" else f"seccomp(unsupported on {machine})"]


def reported(isolation: list[str]) -> list[str]:
    """A report with the reason of a failed private root left out (it names the host's error)."""
    return ["private-root(failed)" if layer.startswith("private-root(failed") else layer for layer in isolation]


def mode_of(limits: Limits) -> str:
    return machine_mode() if limits.namespaces else PROCESS_ONLY


def assert_isolation(result, limits: Limits) -> None:
    """The run got (and reported) exactly the layers this machine gives with these limits."""
    expected = expected_layers(mode_of(limits), limits)
    assert reported(result.isolation) == expected, (mode_of(limits), result.isolation, result.error)
