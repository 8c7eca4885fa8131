"""Single-machine trainer backend (`trainer.backend=local`): GRPO / Workflow-GiGPO on one CPU process.

    python -m recipes.train preset=cpu-smoke trainer.backend=local [overrides...]

It reuses the pieces of the verl path instead of re-implementing them:

* rollout: the agent loop registered in configs/agent_loop.yaml (`AFlowAgentLoop`), instantiated as verl's
  AgentLoopWorker does, generating through `CPUServerManager`, which shares the *trainable* model object
  (so every optimizer step is visible to the next rollout; `update_weights(model)` bumps its version);
  environment: `AFlowWorker` Ray actors on a private local cluster (`local_trainer.num_cpus` CPUs), or on
  the cluster at `$RAY_ADDRESS` when that is set,
  and the embedded llama.cpp executor when `env.executor.base_url` is empty (started here, stopped at the end).
* rows: `data.train_files` parquet read with pandas, passed to `run()` as verl's dataset does
  (`raw_prompt` <- `prompt`, `extra_info`, `reward_model`, `data_source`, `index`), with one `uid` (uuid4)
  per row shared by its `actor_rollout_ref.rollout.n` rollouts.
* advantages: `algorithm.adv_estimator=grpo` -> `agent_system.advantage.grpo_advantages` (verl's
  compute_grpo_outcome_advantage); `workflow_gigpo` -> `compute_workflow_gigpo_advantage`.
* loss: verl's `core_algos.get_policy_loss_fn(actor.policy_loss.loss_mode)` ("vanilla" = clipped PPO),
  with verl's ActorConfig (clip ratios, loss_agg_mode). Optional KL to a frozen reference copy
  (`actor.use_kl_loss`, `kl_loss_coef`, `kl_loss_type`) with verl's `kl_penalty` + `agg_loss`.
  old log-probs: RECOMPUTED under torch.no_grad with the current weights just before the update
  (`local_trainer.old_log_prob: recompute`, default, as verl's actor does); `rollout` uses the rollout
  log-probs returned by the server instead. The mean |rollout - recomputed| is logged as
  `actor/rollout_logprob_diff`.
* optimizer: AdamW (`local_trainer.lr` if set, else `actor.optim.lr`; betas / weight_decay from actor.optim),
  one optimizer step per mini-batch of `actor.ppo_mini_batch_size * n` sequences, gradients accumulated
  over micro-batches of `actor.ppo_micro_batch_size_per_gpu` sequences, clipped to `actor.grad_clip`;
  `actor.ppo_epochs` passes. Micro-batch losses are scaled with verl's `global_batch_info`
  (batch_num_tokens / global_batch_size of the mini-batch), so accumulation equals one big batch.
* checkpoints: `<trainer.default_local_dir>/global_step_N/` = HF weights + tokenizer (save_pretrained)
  and `trainer_state.pt` (optimizer state, global step, RNG); `latest_checkpointed_iteration.txt` beside them,
  as verl writes. Saved every `trainer.save_freq` steps (if > 0) and always at the end.
  Resume follows verl's keys: `trainer.resume_mode` = `disable` | `auto` (the latest checkpoint in
  default_local_dir, if any) | `resume_path` (`trainer.resume_from_path` = a global_step_N directory).
  The resumed run continues at step N+1 until `trainer.total_training_steps`.
* metrics: verl's `Tracking` with `trainer.logger` (console, tensorboard, wandb, ...); the `file` backend
  (verl's JSONL FileLogger) is always added, writing `<default_local_dir>/metrics.jsonl` unless
  VERL_FILE_LOGGER_PATH is set. Per step: reward mean, loss, kl, seconds, tokens.
* at the end: a checkpoint and `<default_local_dir>/reward.png` (reward per step); both paths are printed.

Model: `actor_rollout_ref.model.path` = a local HF directory, or unset / "embedded" (or the hub name of
SmolLM2-135M-Instruct, which is not downloadable offline) for the embedded SmolLM2 from `load_policy(None)`.

`local_trainer.agent_loop` (optional dotted class path) swaps the agent loop and `local_trainer.environment:
false` skips Ray and the executor: the proof-of-learning test uses this to train on a toy reward through
this same trainer step.
"""

from __future__ import annotations

import asyncio
import copy
import json
import os
import random
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

STATE_FILE = "trainer_state.pt"
LATEST_FILE = "latest_checkpointed_iteration.txt"


def _get(section: Any, key: str, default: Any = None) -> Any:
    if section is None:
        return default
    value = section.get(key, default) if hasattr(section, "get") else getattr(section, key, default)
    return default if value is None else value


# ----------------------------------------------------------------------------------------- model


def load_model(path: str | None):
    """(model, tokenizer): a local HF directory, or the embedded SmolLM2 for unset/"embedded"."""
    from agent_system.policy_model import is_embedded, load_policy

    if is_embedded(path):
        return load_policy(None)
    path = str(path)
    if not Path(path).expanduser().is_dir():
        raise FileNotFoundError(f"actor_rollout_ref.model.path={path!r} is not a local model directory "
                                "(use a local HF directory or 'embedded')")
    return load_policy(str(Path(path).expanduser()))


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------------------- batch


def collate(outputs: list, uids: list[str]) -> dict[str, Any]:
    """AgentLoopOutputs -> padded tensors (bs, R) for responses plus per-row extra fields."""
    bs = len(outputs)
    length = max(1, max(len(o.response_ids) for o in outputs))
    responses = torch.zeros(bs, length, dtype=torch.long)
    mask = torch.zeros(bs, length, dtype=torch.float32)
    rollout_lp = torch.zeros(bs, length, dtype=torch.float32)
    has_lp = True
    for i, o in enumerate(outputs):
        n = len(o.response_ids)
        responses[i, :n] = torch.tensor(o.response_ids, dtype=torch.long)
        mask[i, :n] = torch.tensor(o.response_mask[:n], dtype=torch.float32)
        if o.response_logprobs:
            rollout_lp[i, :n] = torch.tensor(o.response_logprobs[:n], dtype=torch.float32)
        else:
            has_lp = False
    scores = torch.tensor([float(o.reward_score or 0.0) for o in outputs])
    token_level_rewards = torch.zeros(bs, length)
    last = (mask.sum(-1).clamp(min=1) - 1).long()
    for i in range(bs):  # verl puts the episode score on the last valid response token
        valid = mask[i].nonzero()
        pos = int(valid[-1]) if len(valid) else int(last[i])
        token_level_rewards[i, pos] = scores[i]
    extra = {k: [(o.extra_fields or {}).get(k) for o in outputs] for k in ("turn_spans", "anchors", "step_rewards",
                                                                       "step_penalties")}
    return {"prompts": [list(o.prompt_ids) for o in outputs], "responses": responses, "response_mask": mask,
            "rollout_log_probs": rollout_lp if has_lp else None, "scores": scores,
            "token_level_rewards": token_level_rewards, "uid": np.asarray(uids, dtype=object), **extra}


def sequence_log_probs(model, prompts: list[list[int]], responses: torch.Tensor, temperature: float,
                       pad_id: int) -> torch.Tensor:
    """log p(response token) under `model` (logits / temperature, as verl's actor), shape (mb, R)."""
    mb, length = responses.shape
    seqs = [p + responses[i].tolist() for i, p in enumerate(prompts)]
    total = max(len(s) for s in seqs)
    ids = torch.full((mb, total), pad_id, dtype=torch.long)
    attn = torch.zeros(mb, total, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
        attn[i, :len(s)] = 1
    # only the positions that predict response tokens go through the LM head (logits_to_keep)
    keep = total - (min(len(p) for p in prompts) - 1)
    logits = model(input_ids=ids, attention_mask=attn, use_cache=False, logits_to_keep=keep).logits.float()
    offset = total - keep
    out = torch.zeros(mb, length, dtype=logits.dtype)
    for i, p in enumerate(prompts):
        start = len(p) - 1 - offset  # logits at position t predict token t+1
        lg = logits[i, start:start + length] / temperature
        out[i] = torch.log_softmax(lg, dim=-1).gather(-1, responses[i].unsqueeze(-1)).squeeze(-1)
    return out


# --------------------------------------------------------------------------------------- trainer


class LocalTrainer:
    def __init__(self, config: DictConfig):
        from verl.utils.config import omega_conf_to_dataclass

        self.config = config
        self.local = config.get("local_trainer") or OmegaConf.create({})
        self.seed = int(_get(self.local, "seed", 0))
        _seed_all(self.seed)
        arr = config.actor_rollout_ref
        self.rollout_cfg = arr.rollout
        self.n = int(_get(arr.rollout, "n", 1))
        self.actor_cfg = omega_conf_to_dataclass(arr.actor)
        self.out_dir = Path(str(config.trainer.default_local_dir)).expanduser()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.total_steps = int(_get(config.trainer, "total_training_steps", 1))
        self.global_step = 0
        self.history: list[dict[str, float]] = []

        resume_dir = self._resume_dir()
        model_path = str(resume_dir) if resume_dir else _get(arr.model, "path", None)
        self.model, self.tokenizer = load_model(model_path)
        self.model.train()
        if bool(_get(arr.model, "enable_gradient_checkpointing", False)) and hasattr(
                self.model, "gradient_checkpointing_enable"):
            self.model.gradient_checkpointing_enable()
        self.ref_model = None
        if self.actor_cfg.use_kl_loss:
            if resume_dir:  # the reference is the starting policy, not the checkpoint
                self.ref_model, _ = load_model(_get(arr.model, "path", None))
            else:
                self.ref_model = copy.deepcopy(self.model)
            self.ref_model.eval().requires_grad_(False)
        optim = self.actor_cfg.optim
        lr = float(_get(self.local, "lr", optim.lr))
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=lr, betas=tuple(optim.betas),
                                           weight_decay=float(optim.weight_decay))
        self.resumed_from = None
        self.resumed_optimizer_step = None
        if resume_dir:
            self._load_state(resume_dir)

        from agent_system.agent_loop.cpu_server import CPUServerManager

        self.server = CPUServerManager(config, model=self.model, tokenizer=self.tokenizer, base_seed=self.seed)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    # ------------------------------------------------------------------------------- resume / save

    def _resume_dir(self) -> Path | None:
        mode = str(_get(self.config.trainer, "resume_mode", "disable"))
        if mode == "disable":
            return None
        if mode == "resume_path":
            path = _get(self.config.trainer, "resume_from_path", None)
            if not path:
                raise ValueError("trainer.resume_mode=resume_path needs trainer.resume_from_path")
            path = Path(str(path)).expanduser()
            if not (path / STATE_FILE).is_file():
                raise FileNotFoundError(f"{path} is not a local-trainer checkpoint (no {STATE_FILE})")
            return path
        if mode == "auto":
            latest = self.out_dir / LATEST_FILE
            if latest.is_file():
                path = self.out_dir / f"global_step_{latest.read_text().strip()}"
                if (path / STATE_FILE).is_file():
                    return path
            return None
        raise ValueError(f"trainer.resume_mode must be disable, auto or resume_path, not {mode!r}")

    def _load_state(self, path: Path) -> None:
        state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.global_step = int(state["global_step"])
        self.history = list(state.get("history", []))
        rng = state.get("rng")
        if rng:
            random.setstate(rng["python"])
            np.random.set_state(rng["numpy"])
            torch.set_rng_state(rng["torch"])
        first = next(iter(self.optimizer.state.values()), {})
        step = first.get("step")
        self.resumed_optimizer_step = float(step) if step is not None else None
        self.resumed_from = str(path)
        print(f"resumed from {path} at step {self.global_step}")

    def save_checkpoint(self) -> Path:
        path = self.out_dir / f"global_step_{self.global_step}"
        path.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)
        torch.save({"optimizer": self.optimizer.state_dict(), "global_step": self.global_step,
                    "history": self.history,
                    "rng": {"python": random.getstate(), "numpy": np.random.get_state(),
                            "torch": torch.get_rng_state()}}, path / STATE_FILE)
        (self.out_dir / LATEST_FILE).write_text(str(self.global_step))
        return path

    # ------------------------------------------------------------------------------------- rollout

    def load_rows(self) -> list[dict[str, Any]]:
        import pandas as pd

        files = self.config.data.train_files
        files = [files] if isinstance(files, str) else list(files)
        frame = pd.concat([pd.read_parquet(str(f)) for f in files], ignore_index=True)
        limit = _get(self.local, "max_rows", None)
        if limit:
            frame = frame.iloc[: int(limit)]
        rows = []
        for i, rec in enumerate(frame.to_dict("records")):
            extra = dict(rec.get("extra_info") or {})
            rows.append({
                "raw_prompt": [dict(m) for m in rec["prompt"]],
                "extra_info": extra,
                "reward_model": dict(rec.get("reward_model") or {}),
                "data_source": rec.get("data_source"),
                "index": extra.get("index", i),
                "agent_name": rec.get("agent_name"),
                "tools_kwargs": {},
            })
        if not rows:
            raise ValueError(f"no rows in {files}")
        return rows

    def _loop_class(self):
        import importlib

        target = _get(self.local, "agent_loop", None)
        if not target:
            import yaml

            path = _get(self.rollout_cfg.agent, "agent_loop_config_path", None)
            name = _get(self.rollout_cfg.agent, "default_agent_loop", "aflow_agent")
            entries = yaml.safe_load(open(str(path))) if path else []
            target = next((e["_target_"] for e in entries if e["name"] == name),
                          "agent_system.agent_loop.aflow_agent_loop.AFlowAgentLoop")
        module, _, name = str(target).rpartition(".")
        return getattr(importlib.import_module(module), name)

    def make_loop(self, cls):
        """Instantiate the agent loop as verl's AgentLoopWorker does (call inside a running event loop)."""
        from verl.experimental.agent_loop.agent_loop import DictConfigWrap, ToolListWrap
        from verl.utils.dataset.rl_dataset import RLHFDataset

        return cls(trainer_config=DictConfigWrap(config=self.config), server_manager=self.server,
                   tokenizer=self.tokenizer, processor=None,
                   hf_model_type=getattr(self.model.config, "model_type", "llama"), dataset_cls=RLHFDataset,
                   data_config=DictConfigWrap(self.config.data), tools=ToolListWrap([]))

    def sampling_params(self) -> dict[str, Any]:
        r = self.rollout_cfg
        params = {"temperature": float(_get(r, "temperature", 1.0)), "top_p": float(_get(r, "top_p", 1.0)),
                  "top_k": int(_get(r, "top_k", -1)), "logprobs": True}
        max_tokens = _get(self.local, "max_tokens", None)
        if max_tokens:
            params["max_tokens"] = int(max_tokens)
        return params

    def rollout(self, rows: list[dict[str, Any]]):
        cls = self._loop_class()
        params = self.sampling_params()
        uids, jobs = [], []
        for row in rows:
            uid = uuid.uuid4().hex
            for _ in range(self.n):
                uids.append(uid)
                jobs.append({**row, "uid": uid})

        async def go():
            loop = self.make_loop(cls)
            return await asyncio.gather(*(loop.run(dict(params), **job) for job in jobs))

        return asyncio.run(go()), uids

    # ---------------------------------------------------------------------------------- update

    def advantages(self, batch: dict[str, Any]) -> torch.Tensor:
        from agent_system.advantage import compute_workflow_gigpo_advantage, gigpo_config, grpo_advantages

        algo = self.config.algorithm
        estimator = str(_get(algo, "adv_estimator", "grpo"))
        norm = bool(_get(algo, "norm_adv_by_std_in_grpo", True))
        if estimator == "grpo":
            adv, _ = grpo_advantages(batch["token_level_rewards"], batch["response_mask"], batch["uid"],
                                     norm_adv_by_std_in_grpo=norm)
        elif estimator == "workflow_gigpo":
            g = gigpo_config(self.config)
            adv, _ = compute_workflow_gigpo_advantage(
                batch["token_level_rewards"], batch["response_mask"], batch["uid"], batch["turn_spans"],
                batch["anchors"], batch["step_rewards"], step_advantage_w=g.step_advantage_w, gamma=g.gamma,
                epsilon=g.epsilon, norm_adv_by_std_in_grpo=norm, step_penalties=batch["step_penalties"])
        else:
            raise ValueError(f"the local trainer supports adv_estimator grpo and workflow_gigpo, not {estimator!r}")
        return adv

    def _log_probs(self, model, batch, idx) -> torch.Tensor:
        temperature = float(_get(self.rollout_cfg, "temperature", 1.0)) or 1.0
        return sequence_log_probs(model, [batch["prompts"][i] for i in idx], batch["responses"][idx],
                                  temperature, self.pad_id)

    def update(self, batch: dict[str, Any]) -> dict[str, float]:
        from verl.trainer.ppo import core_algos

        cfg = self.actor_cfg
        bs = batch["responses"].shape[0]
        mask = batch["response_mask"]
        advantages = self.advantages(batch)
        micro = max(1, int(cfg.ppo_micro_batch_size_per_gpu or 1))
        mini = max(1, int(cfg.ppo_mini_batch_size or bs) * self.n) if cfg.ppo_mini_batch_size else bs
        mini = min(mini, bs)
        policy_loss_fn = core_algos.get_policy_loss_fn(_get(cfg.policy_loss, "loss_mode", "vanilla"))

        old_mode = str(_get(self.local, "old_log_prob", "recompute"))
        with torch.no_grad():
            recomputed = torch.cat([self._log_probs(self.model, batch, list(range(s, min(s + micro, bs))))
                                    for s in range(0, bs, micro)])
            ref = None
            if self.ref_model is not None:
                ref = torch.cat([self._log_probs(self.ref_model, batch, list(range(s, min(s + micro, bs))))
                                 for s in range(0, bs, micro)])
        rollout_lp = batch["rollout_log_probs"]
        lp_diff = float(((recomputed - rollout_lp).abs() * mask).sum() / mask.sum().clamp(min=1)) \
            if rollout_lp is not None else float("nan")
        old = rollout_lp if (old_mode == "rollout" and rollout_lp is not None) else recomputed

        losses, pg_losses, kls, grad_norms, clipfracs = [], [], [], [], []
        for _epoch in range(int(cfg.ppo_epochs or 1)):
            order = torch.randperm(bs).tolist() if cfg.shuffle else list(range(bs))
            for ms in range(0, bs, mini):
                mini_idx = order[ms:ms + mini]
                tokens = int(mask[mini_idx].sum())
                cfg.global_batch_info.update({"dp_size": 1, "batch_num_tokens": max(tokens, 1),
                                              "global_batch_size": len(mini_idx)})
                self.optimizer.zero_grad(set_to_none=True)
                total = 0.0
                for s in range(0, len(mini_idx), micro):
                    idx = mini_idx[s:s + micro]
                    log_prob = self._log_probs(self.model, batch, idx)
                    m = mask[idx]
                    pg_loss, pg_metrics = policy_loss_fn(
                        old_log_prob=old[idx], log_prob=log_prob, advantages=advantages[idx], response_mask=m,
                        loss_agg_mode=cfg.loss_agg_mode, config=cfg)
                    loss = pg_loss
                    if ref is not None:
                        kld = core_algos.kl_penalty(log_prob, ref[idx], kl_penalty=cfg.kl_loss_type)
                        kl_loss = core_algos.agg_loss(kld, m, cfg.loss_agg_mode, **cfg.global_batch_info)
                        loss = loss + cfg.kl_loss_coef * kl_loss
                        kls.append(float(kl_loss.detach()))
                    loss.backward()
                    total += float(loss.detach())
                    pg_losses.append(float(pg_loss.detach()))
                    clipfracs.append(float(pg_metrics.get("actor/pg_clipfrac", 0.0)))
                grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), float(cfg.grad_clip or 1e9))
                if torch.isfinite(grad_norm):
                    with self.server.lock:  # no rollout sees half-updated weights
                        self.optimizer.step()
                grad_norms.append(float(grad_norm))
                losses.append(total)
        self.optimizer.zero_grad(set_to_none=True)
        self.server.update_weights(self.model)  # shared object: bumps the weight version
        return {"actor/loss": float(np.mean(losses)), "actor/pg_loss": float(np.mean(pg_losses)),
                "actor/kl_loss": float(np.mean(kls)) if kls else 0.0, "actor/grad_norm": float(np.mean(grad_norms)),
                "actor/pg_clipfrac": float(np.mean(clipfracs)), "actor/rollout_logprob_diff": lp_diff,
                "critic/advantages/mean": float((advantages * mask).sum() / mask.sum().clamp(min=1))}

    def train_step(self, rows: list[dict[str, Any]]) -> dict[str, float]:
        started = time.monotonic()
        self.server.set_global_steps(self.global_step + 1)
        outputs, uids = self.rollout(rows)
        rollout_s = time.monotonic() - started
        batch = collate(outputs, uids)
        metrics = self.update(batch)
        self.global_step += 1
        reasons = [(o.extra_fields or {}).get("episode_failed") for o in outputs]
        failed = sum(1 for r in reasons if r)
        if failed:
            print(f"step {self.global_step}: {failed} failed episode(s), e.g. {next(r for r in reasons if r)}")
        groups: dict[str, list[float]] = {}
        for uid, score in zip(uids, batch["scores"].tolist(), strict=True):
            groups.setdefault(uid, []).append(score)
        components = [(o.extra_fields or {}).get("reward_components") or {} for o in outputs]
        metrics.update({
            # GRPO learns only from groups whose rollouts scored differently
            "train/groups_with_signal": float(sum(max(g) > min(g) for g in groups.values())),
            "train/groups": float(len(groups)),
            "env/invalid_action_penalty": float(sum(c.get("format", 0.0) for c in components)),
            "critic/score/mean": float(batch["scores"].mean()),
            "critic/score/max": float(batch["scores"].max()),
            "critic/score/min": float(batch["scores"].min()),
            "response_length/mean": float(batch["response_mask"].sum(-1).mean()),
            "perf/total_num_tokens": float(sum(len(p) for p in batch["prompts"]) + int(batch["response_mask"].sum())),
            "perf/response_tokens": float(batch["response_mask"].sum()),
            "timing_s/gen": rollout_s,
            "timing_s/step": time.monotonic() - started,
            "env/failed_episodes": float(failed),
        })
        self.history.append({"step": self.global_step, "reward": metrics["critic/score/mean"],
                             "loss": metrics["actor/loss"]})
        return metrics

    def batches(self, rows):
        """Rows in order (shuffled per epoch with the seed), `data.train_batch_size` at a time, forever."""
        size = int(_get(self.config.data, "train_batch_size", 1))
        epoch = 0
        while True:
            order = list(range(len(rows)))
            if bool(_get(self.config.data, "shuffle", True)):
                random.Random(self.seed + epoch).shuffle(order)
            for s in range(0, len(order) - size + 1 if len(order) >= size else 1, size):
                yield [rows[i] for i in order[s:s + size]]
            epoch += 1


# ------------------------------------------------------------------------------------ environment


class _Environment:
    """Local Ray (if not running) + the embedded executor (if env.executor.base_url is empty)."""

    def __init__(self, config: DictConfig, enabled: bool, num_cpus: int):
        self.config, self.enabled, self.num_cpus = config, enabled, num_cpus
        self.started_ray = False
        self.executor = None

    def __enter__(self):
        if not self.enabled:
            return self
        import ray

        env = self.config.env
        if not str(_get(env.executor, "base_url", "")):
            from aflow import embedded

            self.executor = embedded.start()
            with open_dict(self.config):
                env.executor.base_url = self.executor.base_url
                env.executor.model = self.executor.model
            print(f"started the embedded executor at {self.executor.base_url}")
        if not ray.is_initialized():
            if os.environ.get("RAY_ADDRESS"):  # the user's cluster, sized by whoever started it
                ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False)
            else:
                # a private cluster, even when `ray start` left one running on this machine (a bare
                # ray.init would join that one and refuse num_cpus)
                ray.init(address="local", num_cpus=self.num_cpus, include_dashboard=False, log_to_driver=False)
            self.started_ray = True
        return self

    def __exit__(self, *exc):
        if self.enabled:
            import ray

            if self.started_ray:
                ray.shutdown()
            if self.executor is not None:
                self.executor.stop()
        return False


def hold_workers(config: DictConfig) -> list:
    """Create the AFlowWorker actors up front (so their start-up is not charged to the first step);
    `worker_handle` keeps the owning handles for the life of this process."""
    from agent_system.agent_loop.aflow_agent_loop import env_config_of
    from agent_system.config import EnvConfig
    from agent_system.environments.env_package.aflow.worker import worker_handle

    env = env_config_of(config)
    return [worker_handle(i, env) for i in range(EnvConfig.from_dict(env).num_workers)]


def tracking(config: DictConfig, out_dir: Path, resumed_step: int = 0):
    from verl.utils.tracking import Tracking

    backends = list(_get(config.trainer, "logger", ["console"]))
    if "file" not in backends:
        backends.append("file")
    path = Path(os.environ.get("VERL_FILE_LOGGER_PATH") or out_dir / "metrics.jsonl")
    # verl's FileLogger truncates its file: keep the lines of the steps a resumed run already logged
    kept = [line for line in path.read_bytes().splitlines() if line.strip()] if path.is_file() else []
    kept = [line for line in kept if json.loads(line).get("step", 0) <= resumed_step]
    saved = {k: os.environ.get(k) for k in ("VERL_FILE_LOGGER_PATH", "TENSORBOARD_DIR")}
    os.environ["VERL_FILE_LOGGER_PATH"] = str(path)
    os.environ["TENSORBOARD_DIR"] = saved["TENSORBOARD_DIR"] or str(out_dir / "tensorboard")
    try:
        plain = OmegaConf.to_container(config, resolve=True)
        tracker = Tracking(project_name=str(config.trainer.project_name),
                           experiment_name=str(config.trainer.experiment_name), default_backend=backends, config=plain)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    for line in kept:
        tracker.logger["file"].fp.write(line + b"\n")
    return tracker, str(path)


def plot(history: list[dict[str, float]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([h["step"] for h in history], [h["reward"] for h in history], marker="o")
    ax.set_xlabel("step")
    ax.set_ylabel("mean reward")
    ax.set_title("local trainer: reward per step")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(config: DictConfig) -> dict[str, Any]:
    """Train; returns a summary (steps, history, checkpoint, plot, metrics file, resume info)."""
    from recipes.config import register_resolvers

    register_resolvers()
    import agent_system.agent_loop.aflow_agent_loop  # noqa: F401  (registers "aflow_agent")

    local = config.get("local_trainer") or {}
    enabled = bool(_get(local, "environment", True))
    num_cpus = int(_get(local, "num_cpus", os.cpu_count() or 2))
    with _Environment(config, enabled, num_cpus):
        OmegaConf.resolve(config)
        trainer = LocalTrainer(config)
        rows = trainer.load_rows()
        workers = hold_workers(config) if enabled else []  # noqa: F841  (kept alive for the whole run)
        tracker, metrics_path = tracking(config, trainer.out_dir, trainer.global_step)
        save_freq = int(_get(config.trainer, "save_freq", -1))
        checkpoint = None
        try:
            batches = trainer.batches(rows)
            # skip the batches a resumed run already trained on
            for _ in range(trainer.global_step):
                next(batches)
            while trainer.global_step < trainer.total_steps:
                metrics = trainer.train_step(next(batches))
                print(f"step {trainer.global_step}: reward {metrics['critic/score/mean']:.4f}, "
                      f"loss {metrics['actor/loss']:.4f}, {metrics['timing_s/step']:.1f} s "
                      f"(groups with a reward spread: {metrics['train/groups_with_signal']:.0f}"
                      f"/{metrics['train/groups']:.0f})", flush=True)
                tracker.log(metrics, step=trainer.global_step)
                if save_freq > 0 and trainer.global_step % save_freq == 0:
                    checkpoint = trainer.save_checkpoint()
        finally:
            tracker.finish()
            file_logger = tracker.logger.get("file")
            if file_logger is not None and not file_logger.fp.closed:
                file_logger.fp.close()
        checkpoint = trainer.save_checkpoint()
        png = plot(trainer.history, trainer.out_dir / "reward.png")
        print(f"checkpoint: {checkpoint}")
        print(f"reward plot: {png}")
        summary = {"global_step": trainer.global_step, "history": trainer.history, "checkpoint": str(checkpoint),
                   "plot": str(png), "metrics": metrics_path, "resumed_from": trainer.resumed_from,
                   "resumed_optimizer_step": trainer.resumed_optimizer_step}
        (trainer.out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        return summary
