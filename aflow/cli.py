"""`aflow` command line: evaluate a workflow, serve the embedded executor.

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
from dataclasses import asdict
from pathlib import Path

from aflow import embedded
from aflow.benchmarks import BENCHMARKS, SPLITS, DataError, resolve_data_dir
from aflow.config import EvalConfig, LLMConfig
from aflow.llm import ExecutorError, LLMClient
from aflow.workflows import GOLD, WorkflowNotFound

SETUP_ERRORS = (DataError, ExecutorError, WorkflowNotFound, embedded.EmbeddedUnavailable)


def _add_endpoint_args(parser: argparse.ArgumentParser, role: str) -> None:
    parser.add_argument(f"--{role}-base-url", default=os.environ.get(f"AFLOW_{role.upper()}_BASE_URL"),
                        help=f"OpenAI-compatible base URL of the {role} (default: $AFLOW_{role.upper()}_BASE_URL, "
                             "else the embedded SmolLM2 server)")
    parser.add_argument(f"--{role}-model", default=os.environ.get(f"AFLOW_{role.upper()}_MODEL"))
    parser.add_argument(f"--{role}-api-key-env", default=None,
                        help="variable holding the key (default: inferred from the host; none for local servers)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="aflow", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    ev = sub.add_parser("evaluate", help="run a workflow on a benchmark split and score it")
    ev.add_argument("--benchmark", required=True, choices=sorted(BENCHMARKS))
    ev.add_argument("--split", default="validate", choices=SPLITS)
    ev.add_argument("--workflow", default="builtin:io", help="DIR | builtin:io | builtin:cot | builtin:gold")
    ev.add_argument("--limit", type=int, default=None)
    ev.add_argument("--concurrency", type=int, default=8)
    ev.add_argument("--data-dir", default=None, help="AFlow JSONL directory (default: $AFLOW_DATA_DIR)")
    _add_endpoint_args(ev, "executor")
    ev.add_argument("--no-cache", action="store_true", help="do not read or write the response cache")
    ev.add_argument("--cache-path", default=None)
    ev.add_argument("--out", default=None, help="directory for results.jsonl and summary.json")
    ev.add_argument("--json", action="store_true", help="print the summary as one JSON line last")

    serve = sub.add_parser("serve-executor", help="serve SmolLM2-135M over an OpenAI-compatible API on 127.0.0.1")
    serve.add_argument("--port", type=int, default=8848)
    return parser


def executor_config(args: argparse.Namespace) -> LLMConfig:
    config = LLMConfig(base_url=args.executor_base_url or "", model=args.executor_model or "",
                       api_key_env=args.executor_api_key_env)
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


async def _evaluate(args: argparse.Namespace, endpoint: LLMConfig | None):
    from aflow.evaluate import evaluate

    config = EvalConfig(benchmark=args.benchmark, split=args.split, workflow=args.workflow, limit=args.limit,
                        concurrency=args.concurrency, data_dir=resolve_data_dir(args.data_dir),
                        out=Path(args.out) if args.out else None)
    llm = LLMClient(endpoint) if endpoint is not None else None
    try:
        if llm:
            await llm.check()
        return await evaluate(config, llm, progress=sys.stderr.isatty() or not args.json)
    finally:
        if llm:
            await llm.close()


def cmd_evaluate(args: argparse.Namespace) -> int:
    needs_llm = args.workflow != GOLD
    with executor_endpoint(args, needed=needs_llm) as endpoint:
        summary, _ = asyncio.run(_evaluate(args, endpoint if needs_llm else None))
    s = asdict(summary)
    print(f"{s['benchmark']}/{s['split']} {s['workflow']}: score {s['score']:.4f} on {s['n']} problems, "
          f"{s['errors']} errors, {s['calls']} calls, {s['prompt_tokens']}+{s['completion_tokens']} tokens, "
          f"${s['cost_usd']:.4f}, {s['wall_s']:.1f}s" + (f"; results in {args.out}" if args.out else ""))
    if args.json:
        print(json.dumps(s))
    return 0


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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "evaluate":
            return cmd_evaluate(args)
        return cmd_serve(args)
    except SETUP_ERRORS as exc:
        print(f"aflow: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("aflow: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
