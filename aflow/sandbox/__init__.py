"""Run untrusted code (workflow graphs, Programmer snippets, benchmark tests) in a child process.

The trusted side lives here: it spawns `child.py` with a scrubbed environment in a fresh
temporary directory, enforces the wall-clock limit by killing the whole process group,
caps what it reads back, and serves operator calls made by a sandboxed workflow, so the
untrusted process never holds an API key or a socket. `child.py` confines itself.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from aflow.sandbox.processes import ChildProcess, Zygote, child_environment, spawn_fresh

PIDS_CGROUP = Path("/sys/fs/cgroup/pids/aflow-sandbox")

__all__ = ["CODE_LIMITS", "WORKFLOW_LIMITS", "Limits", "Sandbox", "SandboxResult", "child_environment",
           "run_code", "run_job", "run_workflow"]

OperatorHandler = Callable[[str, dict], Awaitable[Any]]


def _make_undumpable() -> None:
    """Keep same-user processes (a sandbox without namespaces) out of this process's
    /proc/<pid>/environ and memory, where the API keys live."""
    try:
        import ctypes

        ctypes.CDLL(None).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE = 4
    except (OSError, AttributeError):
        pass


@dataclass(frozen=True)
class Limits:
    """Per-execution resource limits. Defaults suit one code snippet or test run."""

    wall_seconds: float = 20.0
    cpu_seconds: int = 15
    memory_mb: int = 1024
    file_size_mb: int = 16
    max_processes: int = 32
    max_message_bytes: int = 8 << 20
    namespaces: bool = True


CODE_LIMITS = Limits()
WORKFLOW_LIMITS = Limits(wall_seconds=600.0, cpu_seconds=60)


@dataclass
class SandboxResult:
    ok: bool
    value: Any = None
    error: str | None = None
    output: str = ""
    seconds: float = 0.0
    isolation: list[str] = field(default_factory=list)


class Sandbox:
    """Runs jobs in sandbox processes. `async with Sandbox() as sandbox:` forks them from a
    zygote (cheap: one interpreter start for the whole run); without `start()`, or if the
    zygote dies, each job gets a fresh interpreter. Confinement is the same either way."""

    def __init__(self, use_zygote: bool = True):
        self.use_zygote = use_zygote
        self._zygote: Zygote | None = None

    async def start(self) -> Sandbox:
        _make_undumpable()
        if self.use_zygote and self._zygote is None:
            zygote = Zygote()
            try:
                await zygote.start()
                self._zygote = zygote
            except (OSError, asyncio.TimeoutError, RuntimeError):
                await zygote.stop()  # fresh interpreters still work
        return self

    async def close(self) -> None:
        if self._zygote is not None:
            await self._zygote.stop()
            self._zygote = None

    async def __aenter__(self) -> Sandbox:
        return await self.start()

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def _spawn(self, workdir: str, limits: Limits) -> ChildProcess:
        if self._zygote is not None and self._zygote.alive:
            try:
                return await self._zygote.spawn(workdir, limits.max_message_bytes)
            except (OSError, RuntimeError, asyncio.TimeoutError):
                pass
        return await spawn_fresh(workdir, limits.max_message_bytes)

    async def run_job(self, job: dict, limits: Limits, on_call: OperatorHandler | None = None) -> SandboxResult:
        """Run one job (see child.py for the protocol) and return what it reported."""
        started = time.monotonic()
        _make_undumpable()
        workdir = tempfile.mkdtemp(prefix="aflow-sbx-")
        job = {**job, "limits": asdict(limits)}
        child = await self._spawn(workdir, limits)
        result = SandboxResult(ok=False, error="the sandboxed process ended without a result")
        try:
            result = await asyncio.wait_for(_converse(child, job, on_call), timeout=limits.wall_seconds)
        except asyncio.TimeoutError:
            result = SandboxResult(ok=False, error=f"timed out after {limits.wall_seconds:g}s (wall clock)")
        finally:
            _kill_group(child.pid)
            await _reap(child)
            if not result.ok and "without a result" in (result.error or ""):
                result.error += _last_line(await _read_stream(child.stderr, 8192))
            child.close()
            output = _read_head(Path(workdir) / "output.log", 4096)
            shutil.rmtree(workdir, ignore_errors=True)
            await _remove_cgroup(child.pid)
        result.output = output
        result.seconds = time.monotonic() - started
        return result

    async def run_code(self, code: str, entry: str | None = None, limits: Limits = CODE_LIMITS) -> SandboxResult:
        """Execute `code`; when `entry` names a function, call it and return its result as text."""
        return await self.run_job({"mode": "code", "code": code, "entry": entry}, limits)

    async def run_workflow(self, graph: str, prompt: str, inputs: dict, on_call: OperatorHandler,
                           operators: list[str], fmt: str = "native", dataset: str = "",
                           limits: Limits = WORKFLOW_LIMITS) -> SandboxResult:
        """Run a workflow's `Workflow(...)(problem, **extras)`; its operator calls go to `on_call`."""
        job = {"mode": "workflow", "graph": graph, "prompt": prompt, "inputs": inputs,
               "operators": operators, "format": fmt, "dataset": dataset}
        return await self.run_job(job, limits, on_call)


async def run_job(job: dict, limits: Limits, on_call: OperatorHandler | None = None) -> SandboxResult:
    """One job in a fresh interpreter (no zygote to manage)."""
    return await Sandbox(use_zygote=False).run_job(job, limits, on_call)


async def run_code(code: str, entry: str | None = None, limits: Limits = CODE_LIMITS) -> SandboxResult:
    return await Sandbox(use_zygote=False).run_code(code, entry, limits)


async def run_workflow(graph: str, prompt: str, inputs: dict, on_call: OperatorHandler, operators: list[str],
                       fmt: str = "native", dataset: str = "", limits: Limits = WORKFLOW_LIMITS) -> SandboxResult:
    return await Sandbox(use_zygote=False).run_workflow(graph, prompt, inputs, on_call, operators, fmt, dataset,
                                                        limits)


async def _converse(process: ChildProcess, job: dict, on_call: OperatorHandler | None) -> SandboxResult:
    write_lock = asyncio.Lock()

    async def send(message: dict) -> None:
        async with write_lock:
            process.stdin.write((json.dumps(message, default=str) + "\n").encode())
            try:
                await process.stdin.drain()
            except (BrokenPipeError, ConnectionResetError):
                pass

    async def serve(message: dict) -> None:
        try:
            if on_call is None:
                raise RuntimeError("no operators are available to this job")
            value = await on_call(str(message.get("op")), dict(message.get("kwargs") or {}))
            reply = {"type": "reply", "id": message.get("id"), "ok": True, "value": value}
        except Exception as exc:  # an operator failure is reported to the workflow, which may handle it
            reply = {"type": "reply", "id": message.get("id"), "ok": False, "error": f"{type(exc).__name__}: {exc}"}
        await send(reply)

    await send(job)
    tasks: set[asyncio.Task] = set()
    try:
        while True:
            try:
                line = await process.stdout.readline()
            except (ValueError, asyncio.LimitOverrunError):
                return SandboxResult(ok=False, error="the sandboxed code sent a message over the size limit")
            if not line:
                code = await process.wait()
                return SandboxResult(ok=False, error=_exit_reason(code))
            try:
                message = json.loads(line)
            except ValueError:
                return SandboxResult(ok=False, error="the sandboxed code wrote garbage on the result channel")
            kind = message.get("type") if isinstance(message, dict) else None
            if kind == "call":
                task = asyncio.create_task(serve(message))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            elif kind == "done":
                return SandboxResult(
                    ok=bool(message.get("ok")),
                    value=message.get("value"),
                    error=message.get("error"),
                    isolation=list(message.get("isolation") or []),
                )
    finally:
        for task in tasks:
            task.cancel()


def _exit_reason(code: int | None) -> str:
    if code is None:
        return "the sandboxed process ended without a result"
    signals = {signal.SIGKILL: "killed (a memory, CPU or process limit)", signal.SIGXCPU: "CPU time limit exceeded",
               signal.SIGXFSZ: "file size limit exceeded", signal.SIGSEGV: "crashed (segmentation fault)"}
    number = -code if code < 0 else code - 128 if code > 128 else 0
    if number:
        try:
            return f"the sandboxed process was {signals.get(signal.Signals(number), signal.Signals(number).name)}"
        except ValueError:
            pass
    return f"the sandboxed process exited (status {code}) without a result"


async def _read_stream(stream: asyncio.StreamReader | None, limit: int) -> str:
    if stream is None:
        return ""
    try:
        return (await asyncio.wait_for(stream.read(limit), timeout=2)).decode("utf-8", "replace")
    except (asyncio.TimeoutError, OSError):
        return ""


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return f": {lines[-1][:300]}" if lines else ""


def _children(pid: int) -> list[int]:
    found: list[int] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                found += [int(p) for p in f.read().split()]
    except OSError:
        pass
    return found


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _kill_group(pid: int) -> None:
    """Kill everything the sandbox started, even a process that left the group.

    The PID namespace's init is the intermediate's child: killing it kills the whole
    namespace. Whatever is left in the pids cgroup (root) is killed by name; the process
    group catches the rest when there are no namespaces."""
    for child in _children(pid):
        _kill(child)
    procs = PIDS_CGROUP / str(pid) / "cgroup.procs"
    killed: set[int] = set()
    for _ in range(100):  # repeat only while something new appears (a fork bomb racing the kill)
        try:
            members = {int(p) for p in procs.read_text().split()}
        except OSError:
            break
        if members <= killed:
            break
        for member in members - killed:
            _kill(member)
        killed |= members
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


async def _reap(process: ChildProcess) -> None:
    try:
        await asyncio.wait_for(process.wait(), timeout=5)
    except asyncio.TimeoutError:
        pass


async def _remove_cgroup(pid: int) -> None:
    """Once the sandbox's processes are reaped its cgroup is empty and can go."""
    path = PIDS_CGROUP / str(pid)
    for _ in range(100):
        try:
            path.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:  # still a member on its way out
            await asyncio.sleep(0.01)


def _read_head(path: Path, limit: int) -> str:
    try:
        with open(path, "rb") as f:
            return f.read(limit).decode("utf-8", "replace")
    except OSError:
        return ""

