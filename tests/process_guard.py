"""A pytest plugin: every test leaves behind no process it started, or it fails, naming what it left.

Around each test it notes the processes that exist; afterwards, a process that was started during the
test and is still running is a leak when it descends from this pytest process (through processes that
were themselves started during the test) or was orphaned to init from a process of this run (it carries
this session's mark, an environment variable every descendant inherits unless it scrubs its environment;
another pytest run on the same machine has another mark). Processes that belong to
fixtures of a wider scope (a session's Ray cluster or embedded server) existed before the test began, so
they and their descendants are not the test's. A leaked process is killed (so the next test starts
clean) and the test errors at teardown with the leaked processes' pids and command lines.

At the end of the session the same check runs over the whole session, so a module- or session-scoped
fixture that leaks fails the run too.

Linux only (/proc); elsewhere the plugin does nothing.
"""

from __future__ import annotations

import os
import signal
import sys
import time
import uuid
from dataclasses import dataclass

import pytest

# a process being shut down at teardown (a server's SIGTERM, Ray's shutdown) may take this long to go
GRACE_S = float(os.environ.get("AFLOW_TEST_LEAK_GRACE_S", "15"))
SESSION_VAR = "AFLOW_TEST_SESSION"
# helpers an interpreter starts once and keeps for its lifetime (started by whichever test first needs one):
# multiprocessing's, and the MATH scorer's sympy workers (aflow.benchmarks.scoring.MATH_POOL, closed at exit)
PER_INTERPRETER = ("multiprocessing.resource_tracker", "multiprocessing.forkserver", "aflow/benchmarks/offload.py")


@dataclass(frozen=True)
class Proc:
    pid: int
    ppid: int
    state: str
    sid: int  # session: a fit's processes keep its session when orphaned
    start: int  # clock ticks since boot: a pid reused by a new process has another start time


def _read(pid: int) -> Proc | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode("latin-1")
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    return Proc(pid, int(fields[1]), fields[0], int(fields[3]), int(fields[19]))


def snapshot() -> dict[int, Proc]:
    procs = {}
    for name in os.listdir("/proc"):
        if name.isdigit() and (proc := _read(int(name))) is not None:
            procs[proc.pid] = proc
    return procs


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode("utf-8", "replace").strip()
    except OSError:
        return ""


def carries(pid: int, mark: bytes) -> bool:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return mark in f.read().split(b"\0")
    except OSError:
        return False


_exempt: set[int] = set()


def exempt(pid: int) -> None:
    """A process the session itself runs in the background (a shared verl fit, tests/fits.py): neither it nor
    its descendants belong to the test that happens to be running when they start."""
    _exempt.add(pid)


def new_processes(before: dict[int, Proc], me: int | None = None) -> list[Proc]:
    """Live processes started since `before` that this process (or an orphaned child of it) left running."""
    me = os.getpid() if me is None else me
    mark = f"{SESSION_VAR}={os.environ.get(SESSION_VAR, '')}".encode()
    now = snapshot()
    old = {(p.pid, p.start) for p in before.values()}

    def is_new(proc: Proc) -> bool:
        return (proc.pid, proc.start) not in old

    leaked = []
    for proc in now.values():
        if proc.pid == me or proc.state in "ZX" or not is_new(proc) or _exempt & {proc.pid, proc.sid}:
            continue
        parent, seen = proc, set()
        while parent.ppid not in (me, 0, 1) and parent.ppid in now and parent.ppid not in seen:
            seen.add(parent.pid)
            parent = now[parent.ppid]
            # below a wider fixture's process, or a fit's: its process, or a process of its session (a Ray head's
            # job driver runs in a session of its own, under the head's job supervisor)
            if not is_new(parent) or parent.pid in _exempt or parent.sid in _exempt:
                break
        else:
            if parent.ppid == me or (parent.ppid == 1 and os.environ.get(SESSION_VAR) and carries(parent.pid, mark)):
                if not any(helper in cmdline(proc.pid) for helper in PER_INTERPRETER):
                    leaked.append(proc)
    return leaked


def wait_for_exit(before: dict[int, Proc], grace_s: float) -> list[Proc]:
    deadline = time.monotonic() + grace_s
    while (leaked := new_processes(before)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return leaked


def describe_and_kill(leaked: list[Proc]) -> str:
    lines = [f"  pid {p.pid}: {cmdline(p.pid)[:200] or '?'}" for p in leaked]
    for proc in leaked:
        try:
            os.kill(proc.pid, signal.SIGKILL)
        except OSError:
            pass
    return "\n".join(lines)


ENABLED = sys.platform.startswith("linux")


def _controller(config) -> bool:
    """The controller of `pytest -n N`: it runs no test, and its workers are its children."""
    return bool(getattr(config.option, "numprocesses", None)) and not hasattr(config, "workerinput")


@pytest.fixture(autouse=True)
def no_process_left_behind(request):
    """Fails the test (at teardown) that leaves a process running; see the module docstring."""
    if not ENABLED:
        yield
        return
    before = snapshot()
    yield
    leaked = wait_for_exit(before, GRACE_S)
    if leaked:
        pytest.fail(f"{request.node.nodeid} left {len(leaked)} process(es) running (killed now):\n"
                    f"{describe_and_kill(leaked)}", pytrace=False)


_session_start: dict[int, Proc] = {}


def pytest_configure(config):
    if ENABLED:
        os.environ[SESSION_VAR] = f"{os.getpid()}-{uuid.uuid4().hex}"  # inherited: marks this run's orphans


def pytest_sessionstart(session):
    if ENABLED and not _controller(session.config):
        _session_start.update(snapshot())


def pytest_sessionfinish(session, exitstatus):
    if not ENABLED or not _session_start:
        return
    leaked = wait_for_exit(_session_start, GRACE_S)
    if leaked:
        session.config.get_terminal_writer().line(
            f"the test session left {len(leaked)} process(es) running (a module or session fixture; killed now):\n"
            f"{describe_and_kill(leaked)}", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
