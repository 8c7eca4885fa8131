"""`AFlowEnvs`: env_num × group_n episodes at once over the worker actors (verl-agent's shape).

Row i of `reset` is played by group_n episodes that share its uid (GRPO's group), so they all
start from the same state; `step` takes one action text per live episode."""

from __future__ import annotations

import asyncio
import uuid

from agent_system.config import EnvConfig
from agent_system.environments.env_package.aflow.worker import route, worker_handle


class AFlowEnvs:
    def __init__(self, env_config: dict, env_num: int, group_n: int, workdir: str | None = None):
        self.cfg = EnvConfig.from_dict(env_config)
        self.env_config = env_config
        self.env_num, self.group_n = env_num, group_n
        self.workdir = workdir
        self.episodes: list[tuple[object, str]] = []  # (worker, episode id)
        self.uids: list[str] = []

    async def reset(self, rows: list[dict]) -> tuple[list[str], list[dict]]:
        if len(rows) != self.env_num:
            raise ValueError(f"reset takes env_num={self.env_num} rows, got {len(rows)}")
        self.episodes, self.uids, calls = [], [], []
        for row in rows:
            uid = str(row.get("uid") or uuid.uuid4())
            benchmark = (row.get("extra_info") or {}).get("benchmark", "")
            worker = worker_handle(route(self.cfg, benchmark, uid), self.env_config, self.workdir)
            for _ in range(self.group_n):
                episode_id = uuid.uuid4().hex
                self.episodes.append((worker, episode_id))
                self.uids.append(uid)
                calls.append(worker.reset.remote(episode_id, uid, row))
        results = await asyncio.gather(*(self._call(c) for c in calls))
        return [r["observation"] for r in results], [{"uid": u} for u in self.uids]

    async def _call(self, ref):
        """Every actor call is bounded: a worker that cannot be placed or hangs is an error, not a wait."""
        return await asyncio.wait_for(ref, timeout=self.cfg.actor_timeout_s)

    async def step(self, texts: list[str | None]) -> tuple[list[str], list[float], list[bool], list[dict]]:
        """One action per episode; None skips an episode that is already done."""
        async def one(i: int, text: str | None):
            if text is None:
                return {"observation": "", "reward": 0.0, "done": True, "info": {"skipped": True}}
            worker, episode_id = self.episodes[i]
            return await self._call(worker.step.remote(episode_id, text))

        results = await asyncio.gather(*(one(i, t) for i, t in enumerate(texts)))
        return ([r["observation"] for r in results], [r["reward"] for r in results], [r["done"] for r in results],
                [r["info"] for r in results])

    async def close(self) -> list[dict]:
        return await asyncio.gather(*(self._call(worker.close.remote(episode_id)) for worker, episode_id in self.episodes))
