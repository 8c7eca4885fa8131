"""A pytest plugin: a test's tier follows from what it starts.

Markers (declared in pyproject.toml; `--strict-markers` refuses any other):
  model  starts a model: the embedded llama.cpp executor or the SmolLM2 policy
  ray    starts a Ray cluster
  fit    runs a verl fit (RayPPOTrainer), which starts both
  sweep  scores whole splits in the sandbox (minutes of CPU)
  slow   any of the four: the tier `-m "not slow"` leaves out
  gpu    needs a CUDA GPU (tests/gpu; skipped without one)

Tests get a model, Ray or a fit through the fixtures in STARTS, and the marker is added at collection from
the fixtures a test uses; a test that starts one in a subprocess it runs itself (`aflow serve-executor`,
`aflow evaluate` with no executor) says so with the marker. `slow` is never written by hand: it is added to
every test that carries one of the four. A test without the marker that starts one anyway fails with the
reason, so the tiers cannot drift: an audit hook sees every subprocess this pytest process starts (Ray's
gcs_server/raylet, a llama.cpp server, `recipes.train`, `launch.sh`).
"""

from __future__ import annotations

import sys
import threading

import pytest

# fixture -> the marker of what it starts
STARTS = {
    "embedded_executor": "model",
    "policy": "model",
    "ray_cluster": "ray",
    "_ray_session": "ray",
    "main_job_run": "fit",
    "rehearsal_run": "fit",
    "guard_run": "fit",
    "toy_learning_runs": "fit",
}
SLOW = ("model", "ray", "fit", "sweep")
# a subprocess whose command line holds one of these starts what the marker names
COMMANDS = {
    "gcs_server": "ray",
    "raylet": "ray",
    "ray start": "ray",
    "llama_cpp.server": "model",
    "recipes.train": "fit",
    "run_local_grpo.sh": "fit",
    "launch.sh": "fit",  # unless an argument starts with "-" (--help, --dry-run, --benchmark: evaluate) or is help
}
BACKGROUND_THREAD = "verl-fits"  # the shared fits' thread (tests/fits.py): its processes are no test's
IMPLIES = {"fit": ("ray", "model")}  # a verl fit starts its own Ray cluster and loads the policy


HEAVY = "heavy"  # the xdist group of every slow test: one worker owns the Ray cluster, the models and the fits


def under_xdist(config) -> bool:
    """A worker of `pytest -n N` (tests/run.sh runs the suite on 2 workers)."""
    return hasattr(config, "workerinput")


def pytest_itemcollected(item):
    """Markers from fixtures, `slow` from the markers, and on xdist workers the slow group: set as each test is
    collected, before any plugin reads them at `pytest_collection_modifyitems` (-m, xdist's loadgroup)."""
    for name, marker in STARTS.items():
        if name in item.fixturenames and item.get_closest_marker(marker) is None:
            item.add_marker(marker)
    starts = [m for m in SLOW if item.get_closest_marker(m) is not None]
    if starts and item.get_closest_marker("slow") is None:
        item.add_marker(pytest.mark.slow(reason="starts " + ", ".join(starts)))
    if starts and under_xdist(item.config):
        item.add_marker(pytest.mark.xdist_group(HEAVY))


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """The order. pytest-randomly has shuffled `items` already (its hook wraps this one); the stable sorts
    below keep that order within each part.

    One process: the tests that read a shared fit (tests/fits.py) go last, so the rest of the suite runs
    while the fits train in the background. On xdist workers: every slow test is in one xdist group
    (`--dist loadgroup`), so one worker holds the session's Ray cluster, embedded server, policy and fits
    while the other runs the rest; the group goes first, so its fits start at once, with its fit readers last."""
    reads_fit = [name for name, marker in STARTS.items() if marker == "fit"]

    def fit_reader(item) -> bool:
        return any(name in item.fixturenames for name in reads_fit)

    if under_xdist(config):
        items.sort(key=lambda item: (item.get_closest_marker("slow") is None, fit_reader(item)))
    else:
        items.sort(key=fit_reader)


def _launches_a_fit(words: list[str]) -> bool:
    """`launch.sh` trains unless an argument starts with "-" (--help, --dry-run, --benchmark ... = evaluate)."""
    at = next((i for i, w in enumerate(words) if w.endswith("launch.sh")), len(words))
    return not any(w.startswith("-") or w == "help" for w in words[at + 1:])


class _Guard:
    """Records, while a test runs, every subprocess it starts that starts a model, Ray or a fit."""

    def __init__(self) -> None:
        self.test: str | None = None
        self.seen: list[tuple[str, str]] = []

    def __call__(self, event: str, args: tuple) -> None:
        if self.test is None or event != "subprocess.Popen" or threading.current_thread().name == BACKGROUND_THREAD:
            return
        argv = args[1]
        words = [str(a) for a in argv] if isinstance(argv, (list, tuple)) else [str(argv)]
        line = " ".join(words)
        for needle, marker in COMMANDS.items():
            if needle not in line:
                continue
            if needle == "launch.sh" and not _launches_a_fit(words):
                continue
            self.seen.append((marker, line[:160]))


_guard = _Guard()


def pytest_configure(config):
    sys.addaudithook(_guard)


@pytest.fixture(autouse=True)
def starts_only_what_it_is_marked_for(request):
    """A test may start a model, Ray or a fit only when it carries that marker (see the module docstring)."""
    _guard.test, _guard.seen = request.node.nodeid, []
    try:
        yield
    finally:
        seen, _guard.test = _guard.seen, None
    marked = {m for m in SLOW if request.node.get_closest_marker(m) is not None}
    marked |= {implied for m in marked for implied in IMPLIES.get(m, ())}
    unmarked = [(marker, line) for marker, line in seen if marker not in marked]
    if unmarked:
        marker, line = unmarked[0]
        pytest.fail(f"{request.node.nodeid} started {line!r} without the marker `{marker}`: use the fixture "
                    f"that starts it (tests/tiers.py STARTS) or mark the test @pytest.mark.{marker}", pytrace=False)
