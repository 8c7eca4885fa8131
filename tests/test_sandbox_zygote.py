"""The zygote path: sandbox processes forked from a pre-started interpreter are confined
exactly like fresh ones, the zygote holds no secrets, and losing it costs speed, not jobs."""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import time

import pytest

from aflow.sandbox import Limits, Sandbox
from tests.isolation import PRIVATE_ROOT, PROCESS_ONLY, READONLY_HOST, assert_isolation, machine_mode

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the sandbox is Linux-only")

FAST = Limits(wall_seconds=5)


def in_zygote(*jobs):
    """Run (source, entry, limits) jobs through one zygote-backed Sandbox."""

    async def go():
        async with Sandbox() as sandbox:
            assert sandbox._zygote is not None and sandbox._zygote.alive
            results = [await sandbox.run_code(src, entry, limits) for src, entry, limits in jobs]
            return results, sandbox._zygote._process.pid

    return asyncio.run(go())


def test_forked_children_are_confined(tmp_path, monkeypatch):
    monkeypatch.setenv("AFLOW_TEST_SECRET", "sk-zygote-secret-0123456789")
    target = tmp_path / "pwned"
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.setblocking(False)
    port = listener.getsockname()[1]
    env_probe = (
        "import os\n"
        "def solve():\n"
        "    seen = str(dict(os.environ))\n"
        "    try:\n"
        "        entries = os.listdir('/proc')\n"
        "    except OSError:\n"  # Landlock, without a private root: no /proc to look in
        "        entries = []\n"
        "    for p in entries:\n"
        "        if p.isdigit():\n"
        "            try:\n"
        "                seen += open(f'/proc/{p}/environ', 'rb').read().decode('latin1')\n"
        "            except OSError:\n"
        "                pass\n"
        "    return 'LEAK' if 'sk-zygote-secret' in seen else 'clean'\n"
    )
    results, zygote_pid = in_zygote(
        ("def solve():\n    return 6 * 7", "solve", FAST),
        (f"open({str(target)!r}, 'w').write('x')", None, FAST),
        (env_probe, "solve", FAST),
        (f"import _socket\ns = _socket.socket()\ns.connect(('127.0.0.1', {port}))", None, FAST),
        ("while True:\n    pass", None, Limits(wall_seconds=2)),
        ("open('here.txt', 'w').write('ok')\ndef solve():\n    return open('here.txt').read()", "solve", FAST),
    )
    ok, write, env, net, hang, local = results
    assert (ok.ok, ok.value) == (True, "42")
    assert not write.ok and not target.exists()
    # the host's tmp path is not in the private root at all; on the host's view it is read-only
    refused = {PRIVATE_ROOT: "No such file or directory", READONLY_HOST: "Read-only file system",
               PROCESS_ONLY: "Permission denied"}[machine_mode()]  # Landlock, without a private root
    assert f"{refused}: {str(target)!r}" in write.error, write.error
    assert (env.ok, env.value) == (True, "clean")
    assert not net.ok and "socket" in net.error.lower()
    with pytest.raises(BlockingIOError):
        listener.accept()
    assert not hang.ok and "timed out" in hang.error
    assert (local.ok, local.value) == (True, "ok")
    for result in (ok, write, env, net, local):  # forked children get every layer this machine gives
        assert_isolation(result, FAST)
    # The zygote stopped with the sandbox (reaped: no zombie left), and never held the secret.
    time.sleep(0.2)
    assert not os.path.exists(f"/proc/{zygote_pid}")


def test_zygote_environment_is_scrubbed(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-should-not-reach-the-zygote-000")

    async def go():
        async with Sandbox() as sandbox:
            pid = sandbox._zygote._process.pid
            return open(f"/proc/{pid}/environ", "rb").read()

    environ = asyncio.run(go())
    assert b"sk-should-not-reach" not in environ
    assert b"OPENAI_API_KEY" not in environ


def test_jobs_survive_the_zygote_dying():
    async def go():
        async with Sandbox() as sandbox:
            first = await sandbox.run_code("def solve():\n    return 1", "solve", FAST)
            sandbox._zygote._process.kill()
            await sandbox._zygote._process.wait()
            second = await sandbox.run_code("def solve():\n    return 2", "solve", FAST)
            return first, second

    first, second = asyncio.run(go())
    assert (first.value, second.value) == ("1", "2")


def test_concurrent_jobs_get_their_own_answers():
    async def go():
        async with Sandbox() as sandbox:
            return await asyncio.gather(*(
                sandbox.run_code(f"def solve():\n    return {i} * {i}", "solve", FAST) for i in range(40)))

    results = asyncio.run(go())
    assert [r.value for r in results] == [str(i * i) for i in range(40)]


def test_a_session_closed_at_once_leaves_no_process():
    """Closing a session right after its spawn (a checker cancelled because the solution did not
    load) must kill the child even before it has a process group of its own: a survivor would
    hold its pipes, and the reap would wait for it."""
    def alive(pid: int) -> bool:
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().rsplit(")", 1)[-1].split()[0] not in ("Z", "X")
        except FileNotFoundError:
            return False

    async def go():
        survivors = []
        async with Sandbox() as sandbox:
            for _ in range(20):
                await sandbox.run_code("x = 1")
            started = time.monotonic()
            for _ in range(10):
                async with sandbox.session({"mode": "candidate", "preamble": "", "solution": "x = 1"}, FAST) as s:
                    pid = s._child.pid
                survivors += [pid] if alive(pid) else []
            # A survivor is only found by the reap's 5 s bound, then by its pipes closing: ten
            # closes would take 50 s or more (a busy machine only adds to it). Done right they
            # take well under a second each; 40 s leaves a busy machine 4 s for each.
            return survivors, time.monotonic() - started

    survivors, seconds = asyncio.run(go())
    assert survivors == [] and seconds < 40
