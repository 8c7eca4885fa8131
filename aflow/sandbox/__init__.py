"""Run untrusted code (workflow graphs, Programmer snippets, benchmark tests) in a child process.

The trusted side lives here: it spawns `child.py` with a scrubbed environment in a fresh
temporary directory, enforces the wall-clock limit by killing the whole process group,
caps what it reads back, and serves operator calls made by a sandboxed workflow, so the
untrusted process never holds an API key or a socket. `child.py` confines itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from aflow.sandbox.processes import ChildProcess, Zygote, child_environment, spawn_fresh

PIDS_CGROUP = Path("/sys/fs/cgroup/pids/aflow-sandbox")

__all__ = ["CODE_LIMITS", "WORKFLOW_LIMITS", "Limits", "Sandbox", "SandboxResult", "Session", "SessionError",
           "NAMESPACES_ENV", "child_environment", "isolation_report", "missing_file_confinement", "node_limits",
           "run_code", "run_job", "run_workflow"]

OperatorHandler = Callable[[str, dict], Awaitable[Any]]

# A node that refuses namespaces (a container), or one told to behave as such for a test run:
# AFLOW_SANDBOX_NAMESPACES=0 makes every job confine itself without them (Landlock and seccomp).
NAMESPACES_ENV = "AFLOW_SANDBOX_NAMESPACES"


def node_limits(limits: Limits) -> Limits:
    return replace(limits, namespaces=False) if os.environ.get(NAMESPACES_ENV) == "0" else limits


def missing_file_confinement(isolation: list[str]) -> list[str]:
    """The layers that would keep a job from reading the node's files, when none of them is there
    (then a reward cannot be trusted: the references are files): [] when one is."""
    if "private-root" in isolation or any(layer.startswith("landlock(abi") for layer in isolation):
        return []
    return ["private-root", "landlock"]


async def isolation_report(limits: Limits | None = None) -> list[str]:
    """The layers a job gets on this node (one trivial job, run as every job is)."""
    async with Sandbox(use_zygote=False) as sandbox:
        result = await sandbox.run_code("def probe():\n    return 1\n", "probe", limits or CODE_LIMITS)
    return list(result.isolation)


def _make_undumpable() -> None:
    """Keep same-user processes (a sandbox without namespaces) out of this process's
    /proc/<pid>/environ and memory, where the API keys live."""
    try:
        import ctypes

        ctypes.CDLL(None).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE = 4
    except (OSError, AttributeError):
        pass


SECRET_NAME_PARTS = ("KEY", "TOKEN", "SECRET", "PASSWORD", "CREDENTIAL")


def redact_secrets(value: Any) -> Any:
    """`value` (text, or lists/dicts of it, as decoded from a sandbox) with the values of
    the parent's secret-looking environment variables replaced by "[redacted]". A sandbox
    never gets the environment, but a job may still come to hold a key (a prompt quoting
    it, a leak elsewhere); what we record from it lands in logs and files, so it is
    cleaned here, once, for every job."""
    secrets = sorted({text for name, text in os.environ.items()
                      if len(text) >= 8 and any(part in name.upper() for part in SECRET_NAME_PARTS)},
                     key=len, reverse=True)  # longest first: a secret containing another goes whole

    def clean(item: Any) -> Any:
        if isinstance(item, str):
            for secret in secrets:
                item = item.replace(secret, "[redacted]")
            return item
        if isinstance(item, list):
            return [clean(x) for x in item]
        if isinstance(item, dict):
            return {clean(k): clean(v) for k, v in item.items()}
        return item

    try:
        return clean(value) if secrets else value
    except RecursionError:  # nested deeper than we can walk: keep nothing of it
        return "[a value too deeply nested to check for secrets]"


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
        limits = node_limits(limits)
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
        result.error, result.output, result.value = map(redact_secrets, (result.error, result.output, result.value))
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

    async def load_workflow(self, graph: str, prompt: str, operators: list[str], fmt: str = "native",
                            dataset: str = "", limits: Limits = WORKFLOW_LIMITS) -> SandboxResult:
        """Load graph.py and prompt.py and construct `Workflow` as a run would, without calling it:
        ok, or the error every problem would have met."""
        job = {"mode": "workflow", "graph": graph, "prompt": prompt, "inputs": {"problem": ""},
               "operators": operators, "format": fmt, "dataset": dataset, "load_only": True}

        async def no_calls(op: str, kwargs: dict) -> Any:
            raise RuntimeError("no operator call while loading")

        return await self.run_job(job, limits, no_calls)

    @contextlib.asynccontextmanager
    async def session(self, job: dict, limits: Limits):
        """A long-lived sandbox process for `job` (see `Session`), confined like any job."""
        _make_undumpable()
        limits = node_limits(limits)
        workdir = tempfile.mkdtemp(prefix="aflow-sbx-")
        session = Session(await self._spawn(workdir, limits), workdir)
        try:
            await session.start({**job, "limits": asdict(limits)})
            yield session
        finally:
            await session.close()


class Session:
    """A sandbox process that stays up and answers requests: the code under test, serving
    calls relayed from a checker. Open with `Sandbox.session(job, limits)`; the process is
    killed and its directory removed when the context ends."""

    def __init__(self, child: ChildProcess, workdir: str):
        self._child = child
        self._workdir = workdir
        self._ids = 0
        self._pending: dict[int, asyncio.Future] = {}
        self._reader: asyncio.Task | None = None
        self._ready = asyncio.get_running_loop().create_future()
        self.failure: str | None = None  # why the process stopped answering

    async def start(self, job: dict) -> None:
        """Send the job; the process loads it while the caller goes on (`ready()` waits)."""
        self._child.stdin.write((json.dumps(job) + "\n").encode())
        await self._child.stdin.drain()
        self._reader = asyncio.create_task(self._read_replies())

    async def ready(self) -> None:
        """Wait for `ready`; raise SessionError with the child's reason if it reported a
        failure (a solution that does not load) or ended instead."""
        await asyncio.shield(self._ready)
        if self.failure is not None:
            raise SessionError(self.failure)

    async def request(self, message: dict) -> dict:
        """Send one request (once the process is ready); its reply, or a failure dict when
        the process failed or is gone."""
        await asyncio.shield(self._ready)
        if self.failure is not None:
            return {"ok": False, "error": self.failure}
        self._ids += 1
        future = asyncio.get_running_loop().create_future()
        self._pending[self._ids] = future
        try:
            self._child.stdin.write((json.dumps({**message, "id": self._ids}) + "\n").encode())
            await self._child.stdin.drain()
        except (BrokenPipeError, ConnectionResetError):
            pass
        return await future

    async def _next_message(self) -> dict:
        try:
            line = await self._child.stdout.readline()
        except (ValueError, asyncio.LimitOverrunError):
            return {"type": "done", "error": "the sandboxed code sent a message over the size limit"}
        if not line:
            return {"type": "done", "error": _exit_reason(await self._child.wait())}
        try:
            message = json.loads(line)
        except (ValueError, RecursionError):
            return {"type": "done", "error": "the sandboxed code wrote garbage on the result channel"}
        return message if isinstance(message, dict) else {"type": "done", "error": "garbage on the channel"}

    async def _read_replies(self) -> None:
        first = await self._next_message()
        if first.get("type") != "ready":
            self.failure = self._reason(first)
        self._ready.set_result(None)
        while self.failure is None:
            message = await self._next_message()
            if message.get("type") == "result":
                future = self._pending.pop(message.get("id"), None)  # type: ignore[arg-type]
                if future is not None and not future.done():
                    future.set_result(message)
                continue
            self.failure = self._reason(message)
            for future in self._pending.values():
                if not future.done():
                    future.set_result({"ok": False, "error": self.failure})
            self._pending.clear()

    @staticmethod
    def _reason(message: dict) -> str:
        error = message.get("error") if message.get("type") == "done" else "an unexpected message"
        return str(error or "the sandboxed process ended")[:1500]

    async def close(self) -> None:
        if not self._ready.done():
            self.failure = "the session was closed"
            self._ready.set_result(None)
        if self._reader is not None:
            self._reader.cancel()
        _kill_group(self._child.pid)
        await _reap(self._child)
        self._child.close()
        shutil.rmtree(self._workdir, ignore_errors=True)
        await _remove_cgroup(self._child.pid)


class SessionError(RuntimeError):
    """A session's process failed before it was ready (its reason is the message)."""


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
            except (ValueError, RecursionError):
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
    _kill(pid)  # killed before its setsid(), it has no group of its own yet


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

