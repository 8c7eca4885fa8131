"""Refusals before any training work: a run that would train on garbage stops here with one line.

Run by recipes/train.py inside the job (so on the cluster, with the job's environment), before verl
starts a worker:

- `check_executor_choice`: a real policy with no executor configured would silently run every workflow on
  the embedded SmolLM2-135M; refused unless `env.executor.base_url=embedded` asks for it.
- `check_data`: every benchmark the parquet names must load in the environment (the split each row
  needs, from `env.data_dir`/AFLOW_DATA_DIR), else every reset fails and verl trains on masked episodes.
- `probe_executor`: the configured executor answers a real chat completion (the probe `aflow evaluate`
  runs at start-up).
"""

from __future__ import annotations

import asyncio
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig

from agent_system.config import EMBEDDED_EXECUTOR, EnvConfig
from recipes.config import ConfigError


def wants_embedded_executor(env: EnvConfig) -> bool:
    return env.executor.base_url in ("", EMBEDDED_EXECUTOR)


def check_executor_choice(config: DictConfig, env: EnvConfig) -> None:
    from agent_system.policy_model import EMBEDDED_TINY, is_embedded

    policy = str(config.actor_rollout_ref.model.get("path") or "")
    if env.executor.base_url == "" and not (is_embedded(policy) or policy == EMBEDDED_TINY):
        raise ConfigError(f"env.executor.base_url is empty: the workflows of policy {policy} would run on the "
                          "embedded SmolLM2-135M executor; set env.executor.base_url and env.executor.model "
                          "(AFLOW_EXECUTOR_BASE_URL/AFLOW_EXECUTOR_MODEL for the recipe), or "
                          "env.executor.base_url=embedded to use it anyway")


def _files(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, list | tuple | ListConfig):
        return [str(v) for v in value]
    return [str(value)]


def needed_splits(config: DictConfig, env: EnvConfig) -> dict[str, set[str]]:
    """benchmark -> the splits the environment will load for the rows of the train and val parquet."""
    import pandas as pd

    from agent_system.environments.env_package.aflow.worker import TRAIN_SPLIT, VALIDATION_SPLIT

    needs: dict[str, set[str]] = defaultdict(set)
    for path in _files(config.data.train_files) + _files(config.data.val_files):
        if not Path(path).is_file():
            raise ConfigError(f"data: {path} does not exist: build it with `python -m data_prep.build` "
                              "(bash launch.sh builds the task data when it is missing)")
        frame = pd.read_parquet(path)
        for source, extra in zip(frame.get("data_source", [None] * len(frame)),
                                 frame.get("extra_info", [None] * len(frame)), strict=True):
            extra = json.loads(extra) if isinstance(extra, str) else dict(extra or {})
            benchmark = extra.get("benchmark") or str(source or "").split("/")[-1]
            if env.mode == "task":
                needs[benchmark].add(VALIDATION_SPLIT if extra.get("split") == VALIDATION_SPLIT else TRAIN_SPLIT)
            else:
                needs[benchmark]  # noqa: B018 -- query rows carry their problem; code ones need public tests
    return needs


def check_data(config: DictConfig, env: EnvConfig) -> None:
    """Load what every parquet row will need in the environment; one line naming all that fails."""
    from aflow.benchmarks import DataError, get_benchmark, resolve_data_dir

    data_dir = resolve_data_dir(env.data_dir)
    problems = []
    for benchmark, splits in sorted(needed_splits(config, env).items()):
        try:
            bench = get_benchmark(benchmark)
        except DataError as exc:
            problems.append(f"{benchmark or '(no benchmark)'}: {exc}")
            continue
        for split in sorted(splits):
            try:
                if len(bench.load(split, data_dir)) < 2:
                    problems.append(f"{benchmark} {split}: fewer than 2 problems")
            except (DataError, OSError, ValueError) as exc:
                problems.append(f"{benchmark} {split}: {exc}")
    if problems:
        where = f"env.data_dir={data_dir}" if data_dir else "no env.data_dir (AFLOW_DATA_DIR unset)"
        raise ConfigError(f"data: the environment cannot load {len(problems)} of what the parquet names, with "
                          f"{where}: {'; '.join(problems)}. Point AFLOW_DATA_DIR (env.data_dir) at AFlow's data "
                          "directory on every node")


def probe_executor(env: EnvConfig) -> None:
    """One real chat completion against the configured executor; one line when it does not answer."""
    if wants_embedded_executor(env):
        return  # started and checked by the task runner (aflow.embedded)
    from aflow.config import LLMConfig
    from aflow.llm import ExecutorError, LLMClient

    if not env.executor.model:
        raise ConfigError(f"env.executor.model is empty for executor {env.executor.base_url}: name its model")

    async def probe() -> None:
        client = LLMClient(LLMConfig(base_url=env.executor.base_url, model=env.executor.model,
                                     api_key_env=env.executor.api_key_env, max_tokens=1, max_retries=2))
        try:
            await client.check(chat=True)
        finally:
            await client.close()

    try:
        asyncio.run(probe())
    except ExecutorError as exc:
        raise ConfigError(f"executor: {exc}") from None
