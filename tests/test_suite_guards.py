"""The suite's own guards (tests/process_guard.py, tests/tiers.py), run on small test files of their own in a
separate pytest process: a leaked process fails the test that left it, naming it, and is killed; a test that
starts a model, Ray or a fit without saying so fails; the markers come from the fixtures a test uses."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the process guard reads /proc")


def run(pytester, monkeypatch, source: str, *args: str):
    pytester.makepyfile(test_probe=source)
    pytester.makeconftest('pytest_plugins = ["tests.process_guard", "tests.tiers"]\n'
                          'import pytest\n'
                          '@pytest.fixture\n'
                          'def ray_cluster():\n'
                          '    yield None\n')
    env_path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    monkeypatch.setenv("PYTHONPATH", env_path)
    monkeypatch.setenv("AFLOW_TEST_LEAK_GRACE_S", "2")
    return pytester.runpytest_subprocess("-p", "no:randomly", "-p", "no:cacheprovider", "-q", "-rA", *args)


def test_a_leaked_child_and_a_leaked_orphan_fail_their_own_tests_and_are_killed(pytester, monkeypatch):
    result = run(pytester, monkeypatch, """
import subprocess
def test_child():
    subprocess.Popen(["sleep", "300"])
def test_orphan():
    subprocess.run(["bash", "-c", "sleep 301 >/dev/null 2>&1 &"])  # bash exits: sleep's parent is init
def test_clean():
    subprocess.run(["sleep", "0.1"])
""")
    result.assert_outcomes(passed=3, errors=2)
    result.stdout.fnmatch_lines(["*test_probe.py::test_child left 1 process(es) running (killed now):*",
                                 "*pid *: sleep 300*"])
    result.stdout.fnmatch_lines(["*test_probe.py::test_orphan left 1 process(es) running*", "*pid *: sleep 301*"])
    assert "test_clean left" not in result.stdout.str()
    assert not [line for line in os.popen("pgrep -a -x sleep").read().splitlines() if line.endswith(("300", "301"))]


def test_a_test_that_starts_ray_without_the_marker_fails_and_a_fixture_marks_it(pytester, monkeypatch):
    result = run(pytester, monkeypatch, """
import subprocess, sys
def test_unmarked():
    subprocess.run([sys.executable, "-c", "pass", "recipes.train"])
def test_via_fixture(ray_cluster, request):
    assert request.node.get_closest_marker("ray") and request.node.get_closest_marker("slow")
def test_fast(request):
    assert request.node.get_closest_marker("slow") is None
""")
    result.assert_outcomes(passed=3, errors=1)
    result.stdout.fnmatch_lines(["*test_unmarked started *recipes.train* without the marker `fit`*"])
    assert run(pytester, monkeypatch, "def test_x(ray_cluster):\n    pass\n", "-m", "not slow").ret == 5  # deselected


def test_on_two_workers_every_slow_test_runs_on_one_of_them(pytester, monkeypatch, tmp_path):
    """tests/run.sh's `-n 2 --dist loadgroup`: one worker owns the Ray cluster, the models and the fits, so
    every slow test must land on the same worker (a pytest that xdist's grouping no longer reaches splits
    them, and each worker would start its own)."""
    log = tmp_path / "workers.txt"
    tests = "\n".join(f"""
@pytest.mark.{marker}
def test_{marker}_{i}():
    open({str(log)!r}, "a").write("{marker} " + os.environ["PYTEST_XDIST_WORKER"] + "\\n")
""" for marker in ("model", "ray", "sweep") for i in range(3))
    fast = "\n".join(f"def test_fast_{i}():\n    time.sleep(0.2)\n" for i in range(6))
    result = run(pytester, monkeypatch, f"import os, time\nimport pytest\n{tests}\n{fast}", "-n", "2",
                 "--dist", "loadgroup")
    result.assert_outcomes(passed=15)
    workers = {line.split()[1] for line in log.read_text().splitlines()}
    assert len(log.read_text().splitlines()) == 9 and len(workers) == 1, log.read_text()
