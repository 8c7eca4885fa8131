"""`aflow` command line: evaluate a workflow, search for one, fetch the data, serve the embedded executor.

Set-up errors (missing data, unknown benchmark, no executor) print one line and exit 2;
everything that goes wrong per problem is recorded in the results instead.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

from aflow import data, embedded, user_config
from aflow.benchmarks import BENCHMARKS, SCORING_VARIANTS, SPLITS, DataError, get_benchmark, resolve_data_dir
from aflow.config import EvalConfig, LLMConfig
from aflow.llm import ExecutorError, LLMClient
from aflow.plugins import PluginError, policy_plugin
from aflow.search.workspace import WorkspaceMismatch
from aflow.tracking import Tracker, TrackingError, parse_loggers
from aflow.workflows import GOLD, WorkflowCheckError, WorkflowNotFound, load_workflow


class SetupError(RuntimeError):
    """A set-up problem found by the command line itself (--out, a workflow that fails its checks)."""


SETUP_ERRORS = (DataError, ExecutorError, WorkflowNotFound, WorkspaceMismatch, embedded.EmbeddedUnavailable,
                SetupError, PluginError, user_config.UserConfigError, TrackingError, data.FetchError)


class OneLineParser(argparse.ArgumentParser):
    """An invalid argument is one line and exit 2 (argparse would print the whole usage first)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see {self.prog} --help)\n")


def positive_int(text: str) -> int:
    """--limit, --concurrency (evaluate and optimize): 0 or a negative number is refused (0 used to
    mean "everything", -1 "all but the last")."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer (1 or more), got {value}")
    return value


def non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not value >= 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def benchmark_name(text: str) -> str:
    """Any case (GSM8K, gsm8k), as data_prep accepts it."""
    return text.strip().lower()


def _add_endpoint_args(parser: argparse.ArgumentParser, role: str) -> None:
    parser.add_argument(f"--{role}-base-url", default=os.environ.get(f"AFLOW_{role.upper()}_BASE_URL"),
                        help=f"OpenAI-compatible base URL of the {role} (default: $AFLOW_{role.upper()}_BASE_URL, "
                             "else the embedded SmolLM2 server)")
    parser.add_argument(f"--{role}-model", default=os.environ.get(f"AFLOW_{role.upper()}_MODEL"))
    parser.add_argument(f"--{role}-api-key-env", default=None,
                        help="variable holding the key (default: inferred from the host; none for local servers)")


def _add_executor_max_tokens(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--executor-max-tokens", type=positive_int, default=LLMConfig.max_tokens,
                        help=f"cap of each executor answer, in tokens (default {LLMConfig.max_tokens})")


def loggers(text: str) -> tuple[str, ...]:
    try:
        return parse_loggers(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_run_args(parser: argparse.ArgumentParser, where: str) -> None:
    """--config and --logger, shared by evaluate and optimize."""
    parser.add_argument("--config", default=None,
                        help="TOML file with [executor]/[optimizer]/[value] endpoints and data_dir (default: "
                             "$AFLOW_CONFIG, else ~/.config/aflow/config.toml when it exists; see README)")
    parser.add_argument("--logger", type=loggers, default=("console",),
                        help=f"comma-separated, as verl's trainer.logger: console (default), tensorboard "
                             f"(files in {where}/tensorboard or $TENSORBOARD_DIR), wandb")


def _add_scoring_arg(parser: argparse.ArgumentParser) -> None:
    """The scoring variant is a named choice, recorded in every result, never implied; the sampling of
    repeated executor requests (ensemble members) with it, since both decide what a score measures."""
    parser.add_argument("--scoring", choices=SCORING_VARIANTS, default="aflow",
                        help="aflow: AFlow's own rules, comparable with the paper (default); reward: the hardened "
                             "rules the RL environment optimises (QA answers that hedge or stuff words score 0)")
    parser.add_argument("--sample-temperature", type=non_negative_float, default=0.7,
                        help="temperature of the k-th repeat (k >= 1) of a request within one workflow run, sent "
                             "with seed k (an ensemble's members are independent samples; default 0.7)")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="aflow", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    ev = sub.add_parser("evaluate", help="run a workflow on a benchmark split and score it")
    ev.add_argument("--benchmark", required=True, choices=sorted(BENCHMARKS), type=benchmark_name)
    ev.add_argument("--split", default="validate", choices=SPLITS)
    ev.add_argument("--workflow", default="builtin:io", help="DIR | builtin:io | builtin:cot | builtin:gold")
    ev.add_argument("--limit", type=positive_int, default=None, help="the first N problems of the split")
    ev.add_argument("--concurrency", type=positive_int, default=8,
                    help="executor calls in flight (problems without calls: runs at once)")
    ev.add_argument("--data-dir", default=None, help="AFlow JSONL directory (default: $AFLOW_DATA_DIR)")
    _add_scoring_arg(ev)
    _add_endpoint_args(ev, "executor")
    _add_executor_max_tokens(ev)
    ev.add_argument("--no-cache", action="store_true", help="do not read or write the response cache")
    ev.add_argument("--cache-path", default=None)
    ev.add_argument("--out", default=None, help="directory for results.jsonl and summary.json")
    again = ev.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true",
                       help="--out holds an earlier (e.g. interrupted) run: run only the problems it has no record for")
    again.add_argument("--overwrite", action="store_true", help="--out holds an earlier run: replace its results")
    ev.add_argument("--json", action="store_true", help="print the summary as one JSON line last")
    _add_run_args(ev, "--out")

    op = sub.add_parser("optimize", help="AFlow search: evolve a workflow on a benchmark's validation split")
    op.add_argument("--benchmark", required=True, choices=sorted(BENCHMARKS), type=benchmark_name)
    op.add_argument("--workspace", required=True, help="run directory (created, or continued with --resume)")
    op.add_argument("--rounds", type=int, default=10)
    op.add_argument("--validation-rounds", type=int, default=3,
                    help="validation runs per workflow (≥ 1): run 1 at the executor's temperature (0), runs 2.. "
                         "sampled at --validation-temperature with a seed per round and run, so they are "
                         "independent samples and never answered with run 1's cached answers")
    op.add_argument("--validation-temperature", type=float, default=0.7,
                    help="executor temperature of validation runs 2.. (default 0.7)")
    op.add_argument("--limit", type=positive_int, default=None,
                    help="cap the validation problems (cheap runs); also caps the test problems of --test "
                         "unless --test-limit is given")
    op.add_argument("--data-dir", default=None, help="AFlow JSONL directory (default: $AFLOW_DATA_DIR)")
    _add_scoring_arg(op)
    _add_endpoint_args(op, "optimizer")
    op.add_argument("--optimizer-policy", default=None, metavar="CHECKPOINT_DIR",
                    help="a trained policy as the optimizer (and the model value): a verl checkpoint of the main "
                         "job (exported on first use) or an exported model directory; started, used and stopped "
                         "by this command, and recorded in the workspace's config.json")
    _add_endpoint_args(op, "executor")
    _add_executor_max_tokens(op)
    op.add_argument("--value-provider", choices=("none", "empirical", "model"), default="none")
    op.add_argument("--value-weight", type=float, default=0.0)
    op.add_argument("--value-base-url", default=None, help="endpoint of the model value (default: the optimizer's)")
    op.add_argument("--value-model", default=None)
    op.add_argument("--selection", choices=("aflow", "ucb"), default="aflow")
    op.add_argument("--seed", type=int, default=0)
    op.add_argument("--concurrency", type=positive_int, default=8)
    op.add_argument("--action-space", choices=("code", "canvas"), default="code",
                    help="what the optimizer answers: code (default; the whole graph.py and prompt.py, AFlow's) "
                         "or canvas (one canvas edit per round, e.g. 'ENSEMBLE 1 3', applied to the parent's "
                         "canvas and compiled to an ordinary graph.py/prompt.py)")
    op.add_argument("--initial-workflow", default=None,
                    help="round 1's workflow: DIR | builtin:NAME (default builtin:io). With --action-space canvas: "
                         "the initial canvas (chain of thought) by default, or a DIR whose graph.py/prompt.py are a "
                         "compiled canvas (a round of a canvas search); any other workflow is refused")
    op.add_argument("--max-retries", type=int, default=3, help="optimizer answers tried per round")
    op.add_argument("--optimizer-max-tokens", type=positive_int, default=OPTIMIZER_DEFAULTS["max_tokens"],
                    help="longest optimizer answer, in tokens (a small local model on a CPU: fewer is faster)")
    op.add_argument("--convergence-rounds", type=int, default=5)
    op.add_argument("--cache-path", default=None)
    op.add_argument("--resume", action="store_true", help="continue the search in --workspace")
    op.add_argument("--test", action="store_true",
                    help="then score the 3 best workflows on the test split (capped by --limit, or --test-limit), "
                         "with a progress bar, and write report.md and plot.png")
    op.add_argument("--test-limit", type=_test_limit, default=None,
                    help="test problems per workflow for --test: a number, or 'all' for the whole split "
                         "(default: --limit, so a capped search stays cheap; gsm8k's test split has 1,055)")
    op.add_argument("--json", action="store_true", help="print the result as one JSON line last")
    _add_run_args(op, "--workspace")

    dat = sub.add_parser("data", help="fetch AFlow's benchmark split files, or check a data directory")
    dsub = dat.add_subparsers(dest="data_command", required=True, metavar="{status,fetch}")
    st = dsub.add_parser("status", help="one line per expected file: present (rows), missing, or differing")
    st.add_argument("--data-dir", default=None, help="AFlow JSONL directory (default: $AFLOW_DATA_DIR)")
    fe = dsub.add_parser("fetch", help=f"download AFlow's {data.ARCHIVE_NAME} (or read a copy) and extract "
                                       "the split files")
    fe.add_argument("--data-dir", default=None,
                    help="where the files go (default: $AFLOW_DATA_DIR, else $XDG_DATA_HOME/aflow/data)")
    source = fe.add_mutually_exclusive_group()
    source.add_argument("--url", default=None, help=f"where to download the archive (default: AFlow's, {data.ARCHIVE_URL})")
    source.add_argument("--archive", default=None,
                        help=f"a local copy of {data.ARCHIVE_NAME} (no network): for machines without internet")
    fe.add_argument("--overwrite", action="store_true", help="replace files already in the data directory")
    fe.add_argument("--max-mb", type=positive_int, default=data.DEFAULT_MAX_MB,
                    help=f"size cap on the download and on what is unpacked (default {data.DEFAULT_MAX_MB})")

    pol = sub.add_parser("policy", help="a trained policy: export a verl checkpoint, serve it over an OpenAI API")
    psub = pol.add_subparsers(dest="policy_command", required=True, metavar="{export,serve}")
    ex = psub.add_parser("export", help="a verl checkpoint -> a Hugging Face model directory (LoRA merged)")
    ex.add_argument("checkpoint", metavar="CHECKPOINT_DIR",
                    help="a run's checkpoint directory (its latest step), a global_step_N directory or its actor/")
    ex.add_argument("--out", required=True, help="the model directory to write")
    ex.add_argument("--base-model", default=None,
                    help="the model a LoRA-only checkpoint was trained from (default: the one the run recorded)")
    ex.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    ps = psub.add_parser("serve", help="serve a policy over an OpenAI-compatible API (vLLM on a GPU, else the CPU)")
    ps.add_argument("model", metavar="DIR|CHECKPOINT_DIR", help="an exported model directory or a verl checkpoint")
    ps.add_argument("--port", type=int, default=8849)
    ps.add_argument("--action-space", choices=("code", "canvas"), default=None,
                    help="canvas: every answer is one canvas edit, decoded with training's grammar (default: the "
                         "action space the run recorded, else code)")
    ps.add_argument("--benchmark", default=None, type=benchmark_name,
                    help="with canvas: the benchmark whose family decides which steps an edit may add")
    ps.add_argument("--model-name", default=None, help="the name clients ask for (default: aflow-policy-stepN)")

    serve = sub.add_parser("serve-executor", help="serve SmolLM2-135M over an OpenAI-compatible API on 127.0.0.1")
    serve.add_argument("--port", type=int, default=8848)

    sub.add_parser("sandbox-check", help="print the isolation layers a sandboxed job gets on this node; exit 3 "
                                         "when nothing keeps it from reading the node's files")
    return parser


def _test_limit(text: str) -> int:
    """--test-limit: a positive number, or 'all' (0: the whole split)."""
    if text.strip().lower() == "all":
        return 0
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'all', got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be ≥ 1 (or 'all'), got {value}")
    return value


def apply_user_config(args: argparse.Namespace) -> None:
    """Fill endpoints and the data directory the command line and environment left unset from the
    config file (aflow.user_config), and say which came from it."""
    config = user_config.load(args.config)
    if config.path is None:
        return
    used = []
    for role, table in config.endpoints.items():
        if not hasattr(args, f"{role}_base_url") or getattr(args, f"{role}_base_url") or getattr(args, f"{role}_model"):
            continue  # not a role of this command, or set on the command line / in the environment
        setattr(args, f"{role}_base_url", table["base_url"])
        setattr(args, f"{role}_model", table["model"])
        if hasattr(args, f"{role}_api_key_env") and not getattr(args, f"{role}_api_key_env"):
            setattr(args, f"{role}_api_key_env", table.get("api_key_env"))
        used.append(role)
    if config.data_dir and not args.data_dir and not os.environ.get("AFLOW_DATA_DIR"):
        args.data_dir = config.data_dir
        used.append("data_dir")
    if used:
        print(f"aflow: from {config.path}: {', '.join(used)}", file=sys.stderr, flush=True)


def run_config(args: argparse.Namespace) -> dict:
    """The run's settings for a logger's run page (plain values only; no key is ever among them)."""
    return {k: v for k, v in vars(args).items() if isinstance(v, (str, int, float, bool)) or v is None}


def executor_config(args: argparse.Namespace) -> LLMConfig:
    return endpoint_config(args, "executor", max_tokens=getattr(args, "executor_max_tokens", LLMConfig.max_tokens))


def endpoint_config(args: argparse.Namespace, role: str, **overrides) -> LLMConfig:
    config = LLMConfig(base_url=getattr(args, f"{role}_base_url") or "", model=getattr(args, f"{role}_model") or "",
                       api_key_env=getattr(args, f"{role}_api_key_env"), **overrides)
    if getattr(args, "no_cache", False):
        config.cache = False
    if getattr(args, "cache_path", None):
        config.cache_path = Path(args.cache_path)
    return config


@contextlib.contextmanager
def executor_endpoint(args: argparse.Namespace, needed: bool = True):
    """Yield the endpoint config; start the embedded server for the run when none is set."""
    config = executor_config(args)
    if not needed or config.base_url:
        if config.base_url and not config.model:
            raise ExecutorError("--executor-model is required with --executor-base-url")
        yield config
        return
    print("aflow: no executor configured; starting the embedded SmolLM2-135M server", file=sys.stderr)
    with embedded.start() as server:
        config.base_url, config.model = server.base_url, server.model
        yield config


RUN_IDENTITY = ("benchmark", "split", "workflow", "scoring")


def prepare_out(out: Path, args: argparse.Namespace, problem_ids: set[str]) -> list[dict] | None:
    """Check --out before anything expensive starts; never overwrite an earlier run's files
    without --overwrite. Returns the earlier records to keep (--resume), else None."""
    if out.exists() and not out.is_dir():
        raise SetupError(f"--out {out} is a file, not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".aflow-write-test-", dir=out)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise SetupError(f"cannot write in --out {out}: {exc.strerror or exc}") from exc
    results, summary = out / "results.jsonl", out / "summary.json"
    existing = [p.name for p in (results, summary) if p.exists()]
    if not existing:
        return [] if args.resume else None
    if args.overwrite:
        summary.unlink(missing_ok=True)  # results.jsonl is truncated when the run opens it
        return None
    if not args.resume:
        raise SetupError(f"--out {out} already holds an earlier run ({', '.join(existing)}): pass --resume to "
                         "complete it, --overwrite to replace it, or choose another --out")
    if summary.exists():
        try:
            before = json.loads(summary.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise SetupError(f"cannot resume: {summary} is unreadable ({exc})") from exc
        for key in RUN_IDENTITY:
            if key in before and before[key] != getattr(args, key):
                raise SetupError(f"cannot resume: {out} holds a run with {key} {before[key]!r}, "
                                 f"not {getattr(args, key)!r} (choose another --out)")
    records = []
    if results.exists():
        for line in results.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a line cut by a crash: that problem runs again
            if isinstance(record, dict) and isinstance(record.get("id"), str):
                records.append(record)
    foreign = sorted({r["id"] for r in records} - problem_ids)
    if foreign:
        raise SetupError(f"cannot resume: {results} has records for {len(foreign)} problems outside this "
                         f"selection (e.g. {foreign[0]}; was --limit different?)")
    return list({r["id"]: r for r in records}.values())


async def _evaluate(args: argparse.Namespace, endpoint: LLMConfig | None, problems, workflow,
                    previous: list[dict] | None):
    from aflow.evaluate import evaluate

    config = EvalConfig(benchmark=args.benchmark, split=args.split, workflow=args.workflow, limit=args.limit,
                        concurrency=args.concurrency, data_dir=resolve_data_dir(args.data_dir),
                        out=Path(args.out) if args.out else None, scoring=args.scoring,
                        sample_temperature=args.sample_temperature)
    if endpoint is not None:  # --concurrency bounds the executor calls in flight
        endpoint.max_concurrency = max(1, args.concurrency)
    llm = LLMClient(endpoint) if endpoint is not None else None
    try:
        if llm:
            await llm.check(chat=True)  # a URL that does not answer a chat completion is a set-up error
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()

        def on_sigint() -> None:  # Ctrl-C: keep what was completed; a second Ctrl-C stops at once
            stop.set()
            loop.remove_signal_handler(signal.SIGINT)

        loop.add_signal_handler(signal.SIGINT, on_sigint)
        try:
            return await evaluate(config, llm, progress=sys.stderr.isatty() or not args.json, problems=problems,
                                  workflow=workflow, previous=previous, stop=stop)
        finally:
            loop.remove_signal_handler(signal.SIGINT)
    finally:
        if llm:
            await llm.close()


def checked_workflow(spec: str, benchmark: str):
    """The workflow, or a set-up error (printed once, not once per problem) when it fails its
    static checks or does not load: graph.py and prompt.py are loaded and Workflow constructed
    in the sandbox, as every problem would, without running it."""
    from aflow.operators import OPERATOR_NAMES
    from aflow.sandbox import Sandbox

    try:
        workflow = load_workflow(spec)
    except WorkflowCheckError as exc:
        raise SetupError(f"workflow {spec} is rejected: {' '.join(str(exc).split())}") from exc
    if spec.startswith("builtin:"):
        return workflow
    loaded = asyncio.run(Sandbox(use_zygote=False).load_workflow(workflow.graph, workflow.prompt, OPERATOR_NAMES,
                                                                 workflow.format, benchmark))
    if not loaded.ok:
        raise SetupError(f"workflow {spec} does not load: {' '.join(str(loaded.error).split())[:500]}")
    return workflow


def cmd_evaluate(args: argparse.Namespace) -> int:
    # Cheap checks first: data, workflow and --out, before any server starts or any call is made.
    out = Path(args.out) if args.out else None
    if (args.resume or args.overwrite) and out is None:
        raise SetupError(f"--{'resume' if args.resume else 'overwrite'} needs --out")
    problems = get_benchmark(args.benchmark).load(args.split, resolve_data_dir(args.data_dir), args.limit)
    workflow = checked_workflow(args.workflow, args.benchmark)
    previous = prepare_out(out, args, {p.id for p in problems}) if out else None
    needs_llm = args.workflow != GOLD
    name = f"evaluate-{args.benchmark}-{args.split}-{Path(args.workflow).name or args.workflow}"
    with Tracker(args.logger, out, "aflow", name, run_config(args)) as tracker, \
            executor_endpoint(args, needed=needs_llm) as endpoint:
        summary, _ = asyncio.run(_evaluate(args, endpoint if needs_llm else None, problems, workflow, previous))
        tracker.log({f"evaluate/{k}": getattr(summary, k) for k in
                     ("score", "errors", "calls", "cost_usd", "prompt_tokens", "completion_tokens", "wall_s")},
                    step=summary.n)
        return report_evaluation(args, summary, out)  # before the embedded server is stopped: no wait


def report_evaluation(args: argparse.Namespace, summary, out: Path | None) -> int:
    s = asdict(summary)
    if summary.interrupted:
        if args.json:
            print(json.dumps(s), flush=True)
        kept = (f"kept in {out / 'results.jsonl'} with a summary marked interrupted in {out / 'summary.json'}; "
                "add --resume to run the rest" if out else "nothing saved (no --out)")
        earlier = f" ({summary.resumed} from the earlier run)" if summary.resumed else ""
        print(f"aflow: interrupted: {summary.n} of {summary.planned} problems done{earlier}, score so far "
              f"{summary.score:.4f}; {kept}", file=sys.stderr, flush=True)
        return 130
    from aflow.sandbox import missing_file_confinement

    missing = missing_file_confinement(summary.isolation) if summary.isolation else []
    if missing:  # the references were readable by the answers: say so next to the score
        print(f"aflow: warning: the sandbox had no file confinement here ({' and '.join(missing)} missing; it got "
              f"{', '.join(summary.isolation)}): answers could read this node's files", file=sys.stderr, flush=True)
    resumed = f" ({summary.resumed} carried over from the earlier run)" if summary.resumed else ""
    print(f"{s['benchmark']}/{s['split']} {s['workflow']}: score {s['score']:.4f} ({s['scoring']} scoring) "
          f"on {s['n']} problems{resumed}, {s['errors']} errors, {s['calls']} calls, "
          f"{s['prompt_tokens']}+{s['completion_tokens']} tokens, ${s['cost_usd']:.4f}, {s['wall_s']:.1f}s; "
          + (f"results in {out}" if out else "results not saved (pass --out DIR to keep them)"), flush=True)
    if args.json:
        print(json.dumps(s), flush=True)
    return 0


OPTIMIZER_DEFAULTS = {"temperature": 0.7, "max_tokens": 1024}


def _say(message: str) -> None:
    print(f"aflow: {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def search_endpoints(args: argparse.Namespace):
    """(executor, optimizer) configs. Neither given: the embedded server is both; only the
    executor given: it optimizes too; only the optimizer given: the embedded one executes."""
    executor = executor_config(args)
    max_tokens = getattr(args, "optimizer_max_tokens", None) or OPTIMIZER_DEFAULTS["max_tokens"]
    optimizer = endpoint_config(args, "optimizer", **{**OPTIMIZER_DEFAULTS, "max_tokens": max_tokens})
    for config, role in ((executor, "executor"), (optimizer, "optimizer")):
        if config.base_url and not config.model:
            raise ExecutorError(f"--{role}-model is required with --{role}-base-url")
    policy = getattr(args, "optimizer_policy", None)
    if policy:
        with policy_plugin().optimizer_endpoint(policy, benchmark=args.benchmark, action_space=args.action_space,
                                                log=_say) as (endpoint, provenance):
            optimizer.base_url, optimizer.model, optimizer.api_key_env = endpoint.base_url, endpoint.model, None
            if args.value_provider == "model" and not args.value_base_url and not args.value_model:
                args.value_model = endpoint.text_model  # a number, not a canvas edit
            args.optimizer_provenance = provenance
            args.optimizer_policy = None  # the executor side below, as without a policy
            with search_endpoints(args) as (executor, _):
                yield executor, optimizer
        return
    if not optimizer.base_url and executor.base_url:
        optimizer.base_url, optimizer.model, optimizer.api_key_env = executor.base_url, executor.model, executor.api_key_env
    if executor.base_url:
        yield executor, optimizer
        return
    print("aflow: no executor configured; starting the embedded SmolLM2-135M server", file=sys.stderr)
    with embedded.start() as server:
        executor.base_url, executor.model = server.base_url, server.model
        if not optimizer.base_url:
            optimizer.base_url, optimizer.model = server.base_url, server.model
        yield executor, optimizer


async def _optimize(args: argparse.Namespace, executor_cfg: LLMConfig, optimizer_cfg: LLMConfig,
                    tracker: Tracker) -> dict:
    from aflow.search.optimizer import Search, SearchConfig
    from aflow.search.report import plot, test_best, write_report
    from aflow.search.selection import SelectionConfig

    config = SearchConfig(
        benchmark=args.benchmark, workspace=Path(args.workspace), rounds=args.rounds,
        validation_rounds=args.validation_rounds, limit=args.limit, data_dir=resolve_data_dir(args.data_dir),
        concurrency=args.concurrency, initial_workflow=args.initial_workflow, max_retries=args.max_retries,
        convergence_rounds=args.convergence_rounds, seed=args.seed, value_provider=args.value_provider,
        selection=SelectionConfig(rule=args.selection, value_weight=args.value_weight), scoring=args.scoring,
        validation_temperature=args.validation_temperature, action_space=args.action_space,
        sample_temperature=args.sample_temperature, optimizer_policy=getattr(args, "optimizer_provenance", None),
    )
    if args.cache_path:
        executor_cfg.cache_path = optimizer_cfg.cache_path = Path(args.cache_path)
    clients = [LLMClient(executor_cfg), LLMClient(optimizer_cfg)]
    if args.value_provider == "model":
        value_cfg = LLMConfig(base_url=args.value_base_url or optimizer_cfg.base_url,
                              model=args.value_model or optimizer_cfg.model, api_key_env=optimizer_cfg.api_key_env)
        clients.append(LLMClient(value_cfg))
    try:
        progress = sys.stderr.isatty() or not args.json  # a progress bar per evaluation, as `aflow evaluate`
        search = Search(config, clients[0], clients[1], clients[2] if len(clients) > 2 else None, progress=progress,
                        on_round=lambda number, metrics: tracker.log(metrics, step=number))
        result = await search.run(resume=args.resume)
        scores: dict[int, float] = {}
        if args.test:
            limit = test_problem_limit(args)
            top = min(3, len(search.tree.nodes))
            print(f"aflow: testing the {top} best workflow(s) on {_test_size(args, limit)} "
                  f"{config.benchmark} test problems each", file=sys.stderr, flush=True)
            scores = await test_best(search.tree, config.workspace, config.benchmark, clients[0], config.data_dir,
                                     limit, config.concurrency, top=top, scoring=config.scoring, progress=progress)
            result.test_score = scores.get(result.best_round)
            tracker.log({f"test/score_round_{r}": v for r, v in scores.items()}
                        | {"test/best_round_score": result.test_score}, step=result.rounds_done)
        results = search.workspace.read_results()
        if results.get("rounds"):  # report and plot after every search, with test scores when --test ran
            write_report(results, scores, config.workspace)
            plot(results, config.workspace / "plot.png", scores)
        return asdict(result)
    finally:
        for client in clients:
            await client.close()


def test_problem_limit(args: argparse.Namespace) -> int | None:
    """Test problems per workflow of --test: --test-limit if given ('all': None), else --limit
    (a search capped for cheapness must not silently run the whole test split), else all."""
    if args.test_limit is not None:
        return args.test_limit or None
    return args.limit


def _test_size(args: argparse.Namespace, limit: int | None) -> str:
    if limit is None:
        why = "--test-limit all" if args.test_limit == 0 else "no --limit or --test-limit"
        return f"all ({why})"
    return f"up to {limit} (--{'test-limit' if args.test_limit else 'limit'} {limit})"


def optimize_arg_error(args: argparse.Namespace) -> str | None:
    """A setting that would make the search meaningless or crash, as one line (exit 2)."""
    if args.rounds < 1:
        return f"--rounds must be ≥ 1 (got {args.rounds}): round 1 evaluates the initial workflow"
    if args.validation_rounds < 1:
        return (f"--validation-rounds must be ≥ 1 (got {args.validation_rounds}): with none, no workflow is "
                "evaluated and every score would be a meaningless 0")
    if args.limit is not None and args.limit < 1:
        return f"--limit must be ≥ 1 (got {args.limit})"
    if args.max_retries < 1:
        return f"--max-retries must be ≥ 1 (got {args.max_retries})"
    if args.optimizer_policy and args.optimizer_base_url:
        return "--optimizer-policy and --optimizer-base-url both name the optimizer: give one"
    if args.validation_temperature < 0:
        return f"--validation-temperature must be ≥ 0 (got {args.validation_temperature})"
    if args.validation_rounds > 1 and args.validation_temperature == 0:
        return ("--validation-temperature 0 makes validation runs 2.. repeat run 1's answers (std always 0): "
                "use a temperature > 0, or --validation-rounds 1")
    return None


def check_initial_workflow(args: argparse.Namespace) -> None:
    """Refuse an initial workflow the search cannot start from before any server starts (a canvas search
    needs a canvas); raises a set-up error."""
    from aflow.search.optimizer import DEFAULT_INITIAL, InitialWorkflowError, initial_workflow

    spec = args.initial_workflow or DEFAULT_INITIAL[args.action_space]
    try:
        initial_workflow(args.benchmark, spec, args.action_space)
    except (InitialWorkflowError, WorkflowCheckError) as exc:
        raise SetupError(' '.join(str(exc).split())) from exc


def cmd_optimize(args: argparse.Namespace) -> int:
    problem = optimize_arg_error(args)
    if problem:
        print(f"aflow: error: {problem}", file=sys.stderr)
        return 2
    check_initial_workflow(args)
    workspace = Path(args.workspace)
    with Tracker(args.logger, workspace, "aflow", f"optimize-{args.benchmark}-{workspace.name}", run_config(args),
                 jsonl=True) as tracker, search_endpoints(args) as (executor_cfg, optimizer_cfg):
        result = asyncio.run(_optimize(args, executor_cfg, optimizer_cfg, tracker))
    test = f", test {result['test_score']:.4f}" if result.get("test_score") is not None else ""
    cached = f" ({result['cached_calls']} answered from the cache)" if result.get("cached_calls") else ""
    print(f"{args.benchmark} ({args.scoring} scoring): {result['rounds_done']} rounds, "
          f"best round {result['best_round']} (validation {result['best_validation_score']:.4f}{test}), "
          f"${result['total_cost_usd']:.4f}, {result['calls']} calls{cached}, {result['wall_s']:.1f}s; "
          f"workspace {args.workspace} (report.md, plot.png)")
    if args.json:
        print(json.dumps(result))
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    """`aflow data status|fetch`: exit 0 when every required file is present, 1 when some are
    missing (a differing file is a warning), 2 on a set-up error."""
    if args.data_command == "status":
        return cmd_data_status(args)
    return cmd_data_fetch(args)


def cmd_data_status(args: argparse.Namespace) -> int:
    data_dir = resolve_data_dir(args.data_dir)
    if data_dir is None:
        default = data.default_data_dir()
        hint = (f"; {default} holds data fetched earlier: export AFLOW_DATA_DIR={default}" if default.is_dir()
                else f"; `aflow data fetch` puts the files in {default}")
        raise SetupError(f"no data directory: pass --data-dir DIR or set AFLOW_DATA_DIR{hint}")
    if data_dir.exists() and not data_dir.is_dir():
        raise SetupError(f"the data directory {data_dir} is a file, not a directory")
    states = data.status(data_dir)
    return report_data(data_dir, states, heading=f"{data_dir}:")


def report_data(data_dir: Path, states: list, heading: str, actions: dict[str, str] | None = None) -> int:
    """The table `status` and `fetch` print (with what fetch did to each file), then one summary line."""
    print(heading)
    width = max(len(s.name) for s in states)
    for s in states:
        action = f"{actions.get(s.name, '-'):<6}  " if actions is not None else ""
        print(f"  {s.name:<{width}}  {action}{s.describe()}")
    missing = [s.name for s in states if s.state == "missing" and s.required]
    differs = [s.name for s in states if s.state == "differs"]
    present = sum(1 for s in states if s.required and s.state != "missing")
    line = f"{present} of {len(data.REQUIRED)} required files present"
    if differs:
        line += (f"; warning: {', '.join(differs)} {'differs' if len(differs) == 1 else 'differ'} from the split "
                 "this project was checked against (scores may not compare with the published ones)")
    if missing:
        line += f"; missing: {', '.join(missing)} (get them with `aflow data fetch --data-dir {data_dir}`)"
    print(line)
    return 1 if missing else 0


def cmd_data_fetch(args: argparse.Namespace) -> int:
    data_dir = resolve_data_dir(args.data_dir)
    chosen = data_dir is None
    if chosen:
        data_dir = data.default_data_dir()
        print(f"aflow: no --data-dir or AFLOW_DATA_DIR: using {data_dir}")
    report = data.fetch(data_dir, url=args.url, archive=Path(args.archive).expanduser() if args.archive else None,
                        overwrite=args.overwrite, max_mb=args.max_mb)
    for note in report.notes:
        print(f"aflow: {note}", file=sys.stderr)
    actions = {s.name: "wrote" for s in report.written} | dict.fromkeys(report.kept, "kept")
    code = report_data(data_dir, data.status(data_dir), heading=f"{data_dir} (wrote: from the archive; kept: "
                       "already there, not replaced):", actions=actions)
    if report.kept:
        print(f"kept {len(report.kept)} files already in {data_dir}: pass --overwrite to replace them with the "
              "archive's")
    if chosen or resolve_data_dir(None) != data_dir:
        print(f"to use it: export AFLOW_DATA_DIR={data_dir}  (or pass --data-dir {data_dir})")
    return code


def cmd_serve(args: argparse.Namespace) -> int:
    server = embedded.start(port=args.port)
    print(server.base_url, flush=True)
    print(f"model: {server.model} (Ctrl-C to stop)", file=sys.stderr, flush=True)

    def leave(*_):  # unwind to the finally below; stopping inside a handler would deadlock wait()
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, leave)
    signal.signal(signal.SIGINT, leave)
    try:
        server.process.wait()
    finally:
        server.stop()
    return 0 if server.process.returncode in (0, -signal.SIGTERM) else 1


def cmd_policy(args: argparse.Namespace) -> int:
    plugin = policy_plugin()
    if args.policy_command == "export":
        out = plugin.export(args.checkpoint, args.out, base_model=args.base_model, overwrite=args.overwrite)
        print(f"exported {args.checkpoint} to {out}: serve it with `aflow policy serve {out}`")
        return 0
    return plugin.serve_forever(args.model, action_space=args.action_space, benchmark=args.benchmark,
                                port=args.port, model_name=args.model_name, log=_say)


def cmd_sandbox_check() -> int:
    """What a cluster node gives the sandbox: run one job and print its layers (README, the sandbox)."""
    from aflow.sandbox import isolation_report, missing_file_confinement

    layers = asyncio.run(isolation_report())
    missing = missing_file_confinement(layers)
    verdict = (f"WEAK: nothing keeps a job from reading this node's files ({' and '.join(missing)} missing); "
               "rewards computed here cannot be trusted" if missing else "ok: jobs cannot read this node's files")
    print(f"sandbox layers: {', '.join(layers) or '(none reported)'}\n{verdict}", flush=True)
    return 3 if missing else 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command in ("evaluate", "optimize"):
            apply_user_config(args)
        if args.command == "evaluate":
            return cmd_evaluate(args)
        if args.command == "optimize":
            return cmd_optimize(args)
        if args.command == "data":
            return cmd_data(args)
        if args.command == "sandbox-check":
            return cmd_sandbox_check()
        if args.command == "policy":
            return cmd_policy(args)
        return cmd_serve(args)
    except SETUP_ERRORS as exc:
        print(f"aflow: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("aflow: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
