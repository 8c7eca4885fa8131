"""How a sandbox process comes to exist: a fresh interpreter, or a fork of a zygote.

A fresh `python -I -S -B child.py` costs about 50-100 ms of CPU (interpreter start-up and the
asyncio import), which dominates an evaluation on a small machine. The zygote is one
such interpreter, started once with the scrubbed environment and the imports done; it
forks a child per job. Either way the caller gets a `ChildProcess`: its pid (also its
process group), pipes to talk to it, and a way to wait for its exit status.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

CHILD = Path(__file__).with_name("child.py")


def _base_interpreter() -> str:
    """The base Python, not a virtualenv's: a venv's interpreter reads pyvenv.cfg and
    points sys.prefix into the project checkout. The child runs it as `-I -S -B`: no
    environment, no user or site directories, so its sys.path is the standard library
    only and child.py can bind exactly that prefix into the job's private root."""
    base = os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)
    return base if os.access(base, os.X_OK) else sys.executable


PYTHON = [_base_interpreter(), "-I", "-S", "-B"]


def child_environment(home: str) -> dict[str, str]:
    """Only what Python needs: no keys, no proxies, no PYTHON* variables."""
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": home,
        "TMPDIR": home,
        "LANG": "C.UTF-8",
        "PYTHONHASHSEED": "0",
        "PYTHONDONTWRITEBYTECODE": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "OMP_NUM_THREADS": "1",
    }


@dataclass
class ChildProcess:
    pid: int
    stdin: asyncio.StreamWriter
    stdout: asyncio.StreamReader
    stderr: asyncio.StreamReader
    wait: Callable[[], Awaitable[int | None]]
    close: Callable[[], None]


async def spawn_fresh(workdir: str, message_limit: int) -> ChildProcess:
    process = await asyncio.create_subprocess_exec(
        *PYTHON, str(CHILD),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,  # only trusted start-up code writes here; the job's output goes to a file
        cwd=workdir,
        env=child_environment(workdir),
        start_new_session=True,
        limit=message_limit,
    )
    assert process.stdin and process.stdout and process.stderr
    return ChildProcess(process.pid, process.stdin, process.stdout, process.stderr, process.wait, lambda: None)


async def _pipe_reader(fd: int, limit: int) -> tuple[asyncio.StreamReader, asyncio.BaseTransport]:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=limit)
    transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(fd, "rb", 0))
    return reader, transport


async def _pipe_writer(fd: int) -> asyncio.StreamWriter:
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.connect_write_pipe(asyncio.streams.FlowControlMixin, os.fdopen(fd, "wb", 0))
    return asyncio.StreamWriter(transport, protocol, None, loop)


class Zygote:
    """A pre-started child interpreter that forks sandbox processes on request.

    Requests go over a unix socket carrying the three pipe ends the new process uses as
    its stdin/stdout/stderr; the zygote answers on its stdout with `started` (the pid)
    and later `exited` (the status) events. It holds no secrets (scrubbed environment)
    and runs no untrusted code itself: confinement happens in each forked child."""

    def __init__(self) -> None:
        self._process: asyncio.subprocess.Process | None = None
        self._control: socket.socket | None = None
        self._ids = 0
        self._started: dict[int, asyncio.Future] = {}  # request id -> pid
        self._exits: dict[int, asyncio.Future] = {}
        self._events: asyncio.Task | None = None

    @property
    def alive(self) -> bool:
        return self._process is not None and self._process.returncode is None

    async def start(self) -> None:
        # SEQPACKET keeps each request (and its fds) one atomic message, so spawns need no lock.
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self._process = await asyncio.create_subprocess_exec(
                *PYTHON, str(CHILD), "--zygote",
                stdin=theirs.fileno(), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
                cwd="/", env=child_environment("/nonexistent"), start_new_session=True,
            )
        finally:
            theirs.close()
        ours.setblocking(False)
        self._control = ours
        hello = self._started_future(0)
        self._events = asyncio.create_task(self._read_events())
        await asyncio.wait_for(hello, timeout=60)  # the zygote says hello as request 0

    async def _read_events(self) -> None:
        assert self._process and self._process.stdout
        while line := await self._process.stdout.readline():
            event = json.loads(line)
            if event["type"] == "started":
                future = self._started.pop(int(event["id"]), None)
                if future is not None and not future.done():
                    future.set_result(int(event["pid"]))
            elif event["type"] == "exited":
                future = self._exit_future(int(event["pid"]))
                if not future.done():
                    future.set_result(event.get("code"))
        for future in self._exits.values():  # the zygote is gone: nobody will report these
            if not future.done():
                future.set_result(None)
        for future in self._started.values():
            if not future.done():
                future.set_exception(RuntimeError("the sandbox zygote exited"))

    def _started_future(self, request_id: int) -> asyncio.Future:
        future = asyncio.get_running_loop().create_future()
        self._started[request_id] = future
        return future

    def _exit_future(self, pid: int) -> asyncio.Future:
        if pid not in self._exits:
            self._exits[pid] = asyncio.get_running_loop().create_future()
        return self._exits[pid]

    async def spawn(self, workdir: str, message_limit: int) -> ChildProcess:
        if not self.alive or self._control is None:
            raise RuntimeError("the sandbox zygote is not running")
        child_in, parent_in = os.pipe()
        parent_out, child_out = os.pipe()
        parent_err, child_err = os.pipe()
        self._ids += 1
        request_id = self._ids
        started = self._started_future(request_id)
        try:
            request = json.dumps({"id": request_id, "workdir": workdir}).encode()
            while True:
                try:
                    socket.send_fds(self._control, [request], [child_in, child_out, child_err])
                    break
                except BlockingIOError:  # the zygote is behind; it drains its queue quickly
                    await asyncio.sleep(0.001)
            pid = await asyncio.wait_for(started, timeout=30)
        finally:
            self._started.pop(request_id, None)
            for fd in (child_in, child_out, child_err):
                os.close(fd)
        stdout, out_transport = await _pipe_reader(parent_out, message_limit)
        stderr, err_transport = await _pipe_reader(parent_err, 1 << 16)
        stdin = await _pipe_writer(parent_in)
        exit_future = self._exit_future(pid)

        async def wait() -> int | None:
            code = await asyncio.shield(exit_future)
            self._exits.pop(pid, None)
            return code

        def close() -> None:
            stdin.close()
            out_transport.close()
            err_transport.close()

        return ChildProcess(pid, stdin, stdout, stderr, wait, close)

    async def stop(self) -> None:
        if self._control is not None:
            self._control.close()
            self._control = None
        if self._process is not None:
            try:
                await asyncio.wait_for(self._process.wait(), timeout=5)
            except asyncio.TimeoutError:
                self._process.kill()
                await self._process.wait()
        if self._events is not None:
            await asyncio.gather(self._events, return_exceptions=True)
