"""The trained policy as a product: a verl checkpoint exported to a Hugging Face model directory, served over an
OpenAI-compatible API, and used as the optimizer (and model value) of `aflow optimize`.

The `aflow` command reaches this package through the `aflow.policy` entry point (aflow/plugins.py), so the
`aflow` package itself imports neither verl nor this layer: `aflow policy export|serve` and
`aflow optimize --optimizer-policy` call `export`, `serve_forever` and `optimizer_endpoint` below. Their
set-up errors (CheckpointError, ServeError) are `aflow.plugins.PluginError`s: one line, exit 2.
"""

from __future__ import annotations

import contextlib
import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path

from agent_system.policy import serving
from agent_system.policy.checkpoint import (
    POLICY_RECORD,
    CheckpointError,
    export,
    find_checkpoint,
    is_model_dir,
)
from agent_system.policy.serving import Endpoint, ServeError

EXPORT_DIR = "policy-hf"  # a checkpoint served directly is exported once into global_step_N/policy-hf

__all__ = ["CheckpointError", "ServeError", "export", "model_dir", "grammar_for", "optimizer_endpoint",
           "serve_forever"]


def model_dir(path: str | Path, log=print) -> tuple[Path, dict]:
    """(a Hugging Face model directory, its provenance) for a model directory or a verl checkpoint; a
    checkpoint is exported on first use into its step's `policy-hf/` and reused afterwards."""
    path = Path(path).expanduser().resolve()
    if is_model_dir(path):
        record = path / POLICY_RECORD
        return path, json.loads(record.read_text()) if record.is_file() else {"model_dir": str(path)}
    ckpt = find_checkpoint(path)
    target = ckpt.step_dir / EXPORT_DIR
    record = target / POLICY_RECORD
    if is_model_dir(target) and record.is_file() and json.loads(record.read_text()).get("checkpoint") == str(ckpt.step_dir):
        return target, json.loads(record.read_text())
    log(f"exporting {ckpt.actor_dir} to {target} (once; verl's model merger)")
    export(ckpt.step_dir, target, overwrite=True)
    return target, json.loads(record.read_text())


def grammar_for(action_space: str, benchmark: str | None) -> str | None:
    """The decoding grammar of training's CPU rollout: canvas actions of the benchmark's family, else none."""
    if action_space != "canvas":
        return None
    if not benchmark:
        raise ServeError("the canvas action space needs --benchmark (its family decides which steps an edit may add)")
    from aflow.benchmarks import get_benchmark
    from agent_system.constrained import grammar_name

    return grammar_name(get_benchmark(benchmark).is_code)


def _name(record: dict, directory: Path) -> str:
    step = record.get("step")
    return f"aflow-policy-step{step}" if step is not None else directory.name


@contextlib.contextmanager
def optimizer_endpoint(path: str | Path, *, benchmark: str, action_space: str,
                       log=print) -> Iterator[tuple[Endpoint, dict]]:
    """The policy served for one search: (endpoint, provenance: what the workspace records)."""
    directory, record = model_dir(path, log)
    grammar = grammar_for(action_space, benchmark)
    with serving.started(directory, _name(record, directory), grammar) as endpoint:
        log(f"optimizer policy: {directory} served by the {endpoint.backend} backend at {endpoint.base_url} "
            f"(model {endpoint.model}{', grammar ' + grammar if grammar else ''})")
        yield endpoint, {**record, "source": str(Path(path).expanduser().resolve()), "model_dir": str(directory),
                         "backend": endpoint.backend, "grammar": grammar}


def serve_forever(path: str | Path, *, action_space: str | None, benchmark: str | None, port: int,
                  model_name: str | None = None, log=print) -> int:
    """`aflow policy serve`: until Ctrl-C or SIGTERM."""
    directory, record = model_dir(path, log)
    action_space = action_space or record.get("run", {}).get("action_space") or "code"
    grammar = grammar_for(action_space, benchmark)

    def leave(*_):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, leave)
    with serving.started(directory, model_name or _name(record, directory), grammar, port=port) as endpoint:
        print(endpoint.base_url, flush=True)
        log(f"model: {endpoint.model} ({endpoint.backend} backend{', grammar ' + grammar if grammar else ''}; "
            "Ctrl-C to stop)")
        try:
            while endpoint.process.poll() is None:
                time.sleep(0.5)
        except KeyboardInterrupt:
            return 0
    return 1
