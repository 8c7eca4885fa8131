"""Advantage estimators for AFlow workflow search on verl 0.9.1's classic `RayPPOTrainer`.

GRPO (`algorithm.adv_estimator=grpo`)
    Needs nothing from this module: verl's own `compute_grpo_outcome_advantage` runs.

Workflow-GiGPO (`algorithm.adv_estimator=workflow_gigpo`)
    advantage(token) = episode_adv + w * step_adv(turn of the token)

    * episode_adv: GRPO over episodes grouped by `uid` (verl's `compute_grpo_outcome_advantage`; the episode
      score is `token_level_rewards.sum(-1)`, as in verl).
    * step_adv: per policy turn t, the discounted return G_t = sum_k gamma^k r_{t+k} over the episode's
      `step_rewards`. Step groups are the turns whose anchor (hash of the normalized workflow the turn acted
      on) is identical within one uid group, across all episodes of that uid (two turns of one episode that
      act on the same workflow share a group too). step_adv = (G_t - mean) / (std + epsilon), where std is
      torch.std (unbiased, n-1), the same estimator verl's GRPO uses for the episode part. A group of one
      turn gets step_adv = 0 (nothing to compare with; the std of one value is undefined).
      With `norm_adv_by_std_in_grpo=False` (Dr.GRPO) neither part is divided by its std.
      Normalisation is per step group over the turns' returns, each turn counted once (the paper's Eq. 3);
      verl-agent's default implementation normalises across step *rows* instead, which weighs a turn by
      how many rows repeat it. At equal inputs the two agree whenever every turn is its own row.
    * An invalid action is penalised at its own step: G_t - step_penalties[t], after discounting (as the
      reference implementation, verl-agent, subtracts its invalid-action penalty). Without it an invalid
      answer at a workflow where valid edits lowered the score (step reward 0 > -0.05) would get a
      *positive* step advantage cancelling the episode's format penalty.
    * The tokens of turn t (its [start, end) span of the response, times response_mask) get
      episode_adv + w * step_adv; response tokens outside every span get episode_adv alone.
    * `returns` equals `advantages`, as for verl's GRPO (there is no critic).
    * w = env.gigpo.step_advantage_w, gamma = env.gigpo.gamma, epsilon = env.gigpo.epsilon
      (`agent_system.config.GiGPOConfig`); `algorithm.gamma` / `algorithm.lam` belong to GAE and are ignored.

Per-turn data (the agent loop's `AgentLoopOutput.extra_fields`; the classic trainer turns every key into
a `non_tensor_batch` column, an object array with one entry per episode):
    turn_spans:   list[[int, int]]  one [start, end) token range of the response per policy turn,
                                    sorted, non-overlapping; ends beyond the (truncated) response are clipped
    anchors:      list[str]         one per turn: hash of the normalized workflow the turn acted on
    step_rewards: list[float]       one per turn
    step_penalties: list[float]     optional; one per turn: the format penalty of an invalid action, else 0
A row where all three are None (or empty) has no turns: its tokens get the episode advantage only.

verl hands registered estimators only rewards, mask, index and config, so the per-turn data cannot reach
a `register_adv_est` function. `install_advantage_hook()` therefore wraps
`verl.trainer.ppo.ray_trainer.compute_advantage(data, adv_estimator, gamma=1.0, lam=1.0, num_repeat=1,
norm_adv_by_std_in_grpo=True, config=None)`, the module global that `RayPPOTrainer.fit` looks up at call
time; every estimator other than "workflow_gigpo" (grpo, gae, ...) goes to the original unchanged.
It must run in the process that runs `RayPPOTrainer.fit` — the Ray TaskRunner actor, not the hydra
driver that launches it (recipes/train.py calls it there). Modules that imported `compute_advantage`
by name (e.g. `verl.experimental.separation.ray_trainer`, `verl.trainer.ppo.v1.utils`) keep the original.
"""

from __future__ import annotations

import functools
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import fields
from typing import Any

import numpy as np
import torch
from verl.trainer.ppo import core_algos

from agent_system.config import EnvConfig, GiGPOConfig

WORKFLOW_GIGPO = "workflow_gigpo"
TURN_FIELDS = ("turn_spans", "anchors", "step_rewards")
PENALTY_FIELD = "step_penalties"  # optional: absent means no per-step penalty

_OWN_MARK = "_aflow_workflow_gigpo"  # set on the functions this module puts into verl


# --------------------------------------------------------------------------------------------- GRPO


# ------------------------------------------------------------------------------------ workflow GiGPO


def discounted_returns(rewards: Sequence[float], gamma: float) -> list[float]:
    """G_t = sum_k gamma^k r_{t+k}, for every t."""
    out = [0.0] * len(rewards)
    running = 0.0
    for t in range(len(rewards) - 1, -1, -1):
        running = float(rewards[t]) + gamma * running
        out[t] = running
    return out


def _turns(spans, anchors, rewards, row: int) -> tuple[list[tuple[int, int]], list[str], list[float]]:
    """One row's per-turn data as plain Python lists, checked."""
    present = [x is not None for x in (spans, anchors, rewards)]
    if not any(present):
        return [], [], []
    if not all(present):
        missing = [name for name, ok in zip(TURN_FIELDS, present, strict=True) if not ok]
        raise ValueError(f"row {row}: per-turn field(s) {missing} are None while others are set")
    spans = [(int(s[0]), int(s[1])) for s in spans]
    anchors = [str(a) for a in anchors]
    rewards = [float(r) for r in rewards]
    if not len(spans) == len(anchors) == len(rewards):
        raise ValueError(
            f"row {row}: {len(spans)} turn_spans, {len(anchors)} anchors, {len(rewards)} step_rewards (must be equal)"
        )
    previous_end = 0
    for start, end in spans:
        if start < previous_end or end < start:
            raise ValueError(f"row {row}: turn_spans {spans} are not sorted, non-overlapping [start, end) ranges")
        previous_end = end
    return spans, anchors, rewards


def step_advantages(
    index: Sequence,
    anchors: Sequence[Sequence[str]],
    step_rewards: Sequence[Sequence[float]],
    gamma: float,
    epsilon: float = 1e-6,
    norm_by_std: bool = True,
    step_penalties: Sequence[Sequence[float] | None] | None = None,
) -> list[list[float]]:
    """Per row, per turn: (G_t - mean) / (std + epsilon) over the turns with the same (uid, anchor),
    where G_t is the discounted return minus the turn's own penalty (`step_penalties`, after discounting).

    std is torch.std (unbiased), as in verl's GRPO; groups of one turn get 0.
    """
    groups: dict[tuple[Any, str], list[tuple[int, int, float]]] = defaultdict(list)
    result: list[list[float]] = []
    penalties = step_penalties if step_penalties is not None else [None] * len(index)
    for i, (uid, row_anchors, row_rewards, row_penalties) in enumerate(
            zip(index, anchors, step_rewards, penalties, strict=True)):
        returns = discounted_returns(row_rewards, gamma)
        if row_penalties is not None and len(row_penalties):
            if len(row_penalties) != len(returns):
                raise ValueError(f"row {i}: {len(row_penalties)} step_penalties for {len(returns)} turns")
            returns = [g - float(p) for g, p in zip(returns, row_penalties, strict=True)]
        result.append([0.0] * len(returns))
        for t, (anchor, g) in enumerate(zip(row_anchors, returns, strict=True)):
            groups[(uid, anchor)].append((i, t, g))
    for members in groups.values():
        if len(members) == 1:
            continue  # singleton step group: step advantage 0
        values = torch.tensor([g for _, _, g in members], dtype=torch.float64)
        centered = values - values.mean()
        if norm_by_std:
            centered = centered / (torch.std(values) + epsilon)
        for (i, t, _), adv in zip(members, centered.tolist(), strict=True):
            result[i][t] = adv
    return result


def compute_workflow_gigpo_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: Sequence | np.ndarray,
    turn_spans: Sequence,
    anchors: Sequence,
    step_rewards: Sequence,
    step_advantage_w: float = GiGPOConfig.step_advantage_w,
    gamma: float = GiGPOConfig.gamma,
    epsilon: float = GiGPOConfig.epsilon,
    norm_adv_by_std_in_grpo: bool = True,
    step_penalties: Sequence | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Workflow-GiGPO advantages (see the module docstring): (advantages, returns), each (bs, response_length).

    `turn_spans`, `anchors`, `step_rewards` hold one entry per row (None for a row without turns).
    """
    batch_size, length = response_mask.shape
    index = np.asarray(index, dtype=object)
    if not len(index) == len(turn_spans) == len(anchors) == len(step_rewards) == batch_size:
        raise ValueError(
            f"batch of {batch_size} rows but {len(index)} uids, {len(turn_spans)} turn_spans, "
            f"{len(anchors)} anchors, {len(step_rewards)} step_rewards"
        )
    rows = [_turns(turn_spans[i], anchors[i], step_rewards[i], i) for i in range(batch_size)]

    episode_adv, _ = core_algos.compute_grpo_outcome_advantage(
        token_level_rewards=token_level_rewards,
        response_mask=response_mask,
        index=index,
        epsilon=epsilon,
        norm_adv_by_std_in_grpo=norm_adv_by_std_in_grpo,
    )
    step_adv = step_advantages(
        index,
        [r[1] for r in rows],
        [r[2] for r in rows],
        gamma=gamma,
        epsilon=epsilon,
        norm_by_std=norm_adv_by_std_in_grpo,
        step_penalties=[None if step_penalties is None else step_penalties[i] for i in range(batch_size)],
    )

    advantages = episode_adv.clone()
    mask = response_mask.to(advantages.dtype)
    with torch.no_grad():
        for i, (spans, _, _) in enumerate(rows):
            for (start, end), adv in zip(spans, step_adv[i], strict=True):
                start, end = min(start, length), min(end, length)  # truncated responses
                if end > start and adv != 0.0:
                    advantages[i, start:end] += step_advantage_w * adv * mask[i, start:end]
    return advantages, advantages


def compute_workflow_gigpo_from_data(data, gigpo: GiGPOConfig, norm_adv_by_std_in_grpo: bool = True):
    """Fill data.batch["advantages"] / ["returns"] from a verl DataProto; returns `data`."""
    batch, non_tensor = data.batch, data.non_tensor_batch
    if "uid" not in non_tensor:
        raise KeyError("workflow_gigpo needs non_tensor_batch['uid'] (the GRPO group id)")
    missing = [name for name in TURN_FIELDS if name not in non_tensor]
    if missing:
        raise KeyError(
            f"workflow_gigpo needs non_tensor_batch columns {list(TURN_FIELDS)} (the agent loop's extra_fields); "
            f"missing {missing}"
        )
    advantages, returns = compute_workflow_gigpo_advantage(
        token_level_rewards=batch["token_level_rewards"],
        response_mask=batch["response_mask"],
        index=non_tensor["uid"],
        turn_spans=non_tensor["turn_spans"],
        anchors=non_tensor["anchors"],
        step_rewards=non_tensor["step_rewards"],
        step_advantage_w=gigpo.step_advantage_w,
        gamma=gigpo.gamma,
        epsilon=gigpo.epsilon,
        norm_adv_by_std_in_grpo=norm_adv_by_std_in_grpo,
        step_penalties=non_tensor.get(PENALTY_FIELD),
    )
    batch["advantages"] = advantages
    batch["returns"] = returns
    return data


# ------------------------------------------------------------------------------- config resolution


def _plain(value: Any) -> Any:
    """An OmegaConf node as plain containers; anything else unchanged."""
    try:
        from omegaconf import DictConfig, OmegaConf
    except ImportError:  # pragma: no cover - omegaconf comes with verl
        return value
    if isinstance(value, DictConfig):
        return OmegaConf.to_container(value, resolve=True)
    return value


def _gigpo_section(section: Mapping) -> GiGPOConfig:
    known = {f.name for f in fields(GiGPOConfig)}
    unknown = sorted(set(section) - known)
    if unknown:
        raise ValueError(f"unknown key(s) in env.gigpo: {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    return GiGPOConfig(**section)


def gigpo_config(config: Any = None) -> GiGPOConfig | None:
    """GiGPO settings from a GiGPOConfig, an EnvConfig, a trainer config with `env.gigpo` (dict or OmegaConf),
    or an `env.gigpo` mapping. None when `config` has no such section (callers then use GiGPOConfig())."""
    if config is None:
        return None
    if isinstance(config, GiGPOConfig):
        return config
    if isinstance(config, EnvConfig):
        return config.gigpo
    if not isinstance(config, Mapping):  # OmegaConf's DictConfig is a Mapping
        raise TypeError(f"cannot read env.gigpo from {type(config).__name__}")
    if "env" in config:
        env = config["env"]
        if env is None:
            return None
        if isinstance(env, EnvConfig):
            return env.gigpo
        return gigpo_config(env.get("gigpo")) if isinstance(env, Mapping) else None
    section = _plain(config)  # only the gigpo section is resolved, never the whole trainer config
    known = {f.name for f in fields(GiGPOConfig)}
    if section and set(section) <= known:
        return _gigpo_section(section)
    return None


def _gigpo_from_trainer(algorithm_config: Any) -> GiGPOConfig | None:
    """env.gigpo of the full trainer config that `algorithm_config` (self.config.algorithm) belongs to."""
    get_root = getattr(algorithm_config, "_get_root", None)  # OmegaConf nodes know their root config
    if get_root is None:
        return None
    try:
        root = get_root()
    except Exception:  # a detached or odd node: no trainer config to read
        return None
    if root is algorithm_config or not isinstance(root, Mapping):
        return None
    return gigpo_config(root)


# -------------------------------------------------------------------------------------- the hook


def _is_ours(fn: Any) -> bool:
    return bool(getattr(fn, _OWN_MARK, False))


def _is_wrapper(fn: Any) -> bool:
    return _is_ours(fn) and hasattr(fn, "original")


def _estimator_name(adv_estimator: Any) -> str:
    return str(getattr(adv_estimator, "value", adv_estimator))


def _registered_estimator(token_level_rewards, response_mask, config=None, index=None, **kwargs):
    """Stand-in behind verl's registry: only the installed hook has the per-turn data."""
    raise RuntimeError(
        "adv_estimator=workflow_gigpo needs per-turn data that verl does not pass to registered estimators: "
        "call agent_system.advantage.install_advantage_hook() in the task-runner process before training"
    )


setattr(_registered_estimator, _OWN_MARK, True)


def register_estimator() -> None:
    """Register "workflow_gigpo" in verl's estimator registry (once; safe across re-imports)."""
    current = core_algos.ADV_ESTIMATOR_REGISTRY.get(WORKFLOW_GIGPO)
    if current is None:
        core_algos.register_adv_est(WORKFLOW_GIGPO)(_registered_estimator)
    elif not _is_ours(current):
        raise ValueError(f"advantage estimator {WORKFLOW_GIGPO!r} is already registered to {current!r}")


def install_advantage_hook(config: Any = None, observer=None):
    """Route `adv_estimator=workflow_gigpo` in the classic trainer to Workflow-GiGPO; idempotent.

    `observer(data)`, when given, sees every batch at the advantage step (rewards, uids and the agent
    loop's extra fields are all there): the run report counts groups with a reward spread with it.

    Wraps `verl.trainer.ppo.ray_trainer.compute_advantage`; any other estimator calls the original unchanged.
    `config` (optional): the trainer config (reads `env.gigpo`), an EnvConfig, a GiGPOConfig, or an
    `env.gigpo` mapping. Without it, each call reads `env.gigpo` from the trainer config that the `config=`
    argument of `compute_advantage` (self.config.algorithm) belongs to, else uses GiGPOConfig() defaults.
    Calling again does not wrap twice; it replaces the settings given by `config`.
    Must run in the process that runs RayPPOTrainer.fit (the TaskRunner actor). Returns the wrapper.
    """
    from verl.trainer.ppo import ray_trainer

    register_estimator()
    settings = gigpo_config(config)
    current = ray_trainer.compute_advantage
    if _is_wrapper(current):
        current.gigpo = settings
        current.observer = observer
        return current

    original = current

    @functools.wraps(original)
    def compute_advantage(
        data,
        adv_estimator,
        gamma: float = 1.0,
        lam: float = 1.0,
        num_repeat: int = 1,
        norm_adv_by_std_in_grpo: bool = True,
        config=None,
    ):
        apply_group_diversity(data, _diversity_weight(config))
        if compute_advantage.observer is not None:
            compute_advantage.observer(data)
        if _estimator_name(adv_estimator) != WORKFLOW_GIGPO:
            data = original(
                data,
                adv_estimator,
                gamma=gamma,
                lam=lam,
                num_repeat=num_repeat,
                norm_adv_by_std_in_grpo=norm_adv_by_std_in_grpo,
                config=config,
            )
            if _estimator_name(adv_estimator) == "grpo":
                zero_flat_groups(data)
            return data
        if "response_mask" not in data.batch.keys():  # same back-compat step as the original
            data.batch["response_mask"] = ray_trainer.compute_response_mask(data)
        gigpo = compute_advantage.gigpo or _gigpo_from_trainer(config) or GiGPOConfig()
        return compute_workflow_gigpo_from_data(data, gigpo, norm_adv_by_std_in_grpo=norm_adv_by_std_in_grpo)

    compute_advantage.gigpo = settings
    compute_advantage.observer = observer
    compute_advantage.original = original
    setattr(compute_advantage, _OWN_MARK, True)
    ray_trainer.compute_advantage = compute_advantage
    return compute_advantage


def _diversity_weight(algorithm_config: Any) -> float:
    """env.reward.diversity_weight of the trainer config `algorithm_config` belongs to (0 if unset)."""
    get_root = getattr(algorithm_config, "_get_root", None)
    try:
        root = get_root() if get_root else None
        return float(root["env"]["reward"]["diversity_weight"]) if root is not None else 0.0
    except (KeyError, TypeError, ValueError):
        return 0.0


def apply_group_diversity(data, weight: float) -> None:
    """WA-GRPO's group diversity term: it needs every episode of a uid, so it is added here, at
    the batch level, to each episode's reward (its last response token) before advantages."""
    if weight == 0 or "final_operators" not in data.non_tensor_batch or "uid" not in data.non_tensor_batch:
        return
    from agent_system.reward import group_diversity_bonus

    signatures = [frozenset(ops or []) for ops in data.non_tensor_batch["final_operators"]]
    bonus = group_diversity_bonus(signatures, [str(u) for u in data.non_tensor_batch["uid"]], weight)
    rewards = data.batch["token_level_rewards"]
    last = data.batch["response_mask"].sum(-1).clamp(min=1) - 1
    for row, value in enumerate(bonus):
        rewards[row, int(last[row])] += value


def zero_flat_groups(data) -> int:
    """GRPO's advantage is 0 for a group whose episodes all scored the same, in exact arithmetic; verl
    computes (score - mean) / (std + 1e-6) in float32, where the mean of eight -0.1 is not exactly -0.1, and
    the rounding error divided by 1e-6 became a constant advantage of ~0.007 on every token of such a group
    (measured in the rehearsal): a push towards whatever was sampled, with no reward behind it. Those
    groups get 0. Returns how many rows were zeroed."""
    if "uid" not in data.non_tensor_batch or "advantages" not in data.batch.keys():
        return 0

    scores = data.batch["token_level_rewards"].sum(-1).tolist()
    groups: dict[Any, list[float]] = {}
    for uid, score in zip(data.non_tensor_batch["uid"], scores, strict=True):
        groups.setdefault(uid, []).append(score)
    flat = torch.tensor([max(groups[uid]) == min(groups[uid]) for uid in data.non_tensor_batch["uid"]])
    if flat.any():
        for key in ("advantages", "returns"):
            if key in data.batch.keys():
                data.batch[key][flat] = 0.0
    return int(flat.sum())


def uninstall_advantage_hook() -> None:
    """Put verl's original `compute_advantage` back (the registry entry stays)."""
    from verl.trainer.ppo import ray_trainer

    current = ray_trainer.compute_advantage
    if _is_wrapper(current):
        ray_trainer.compute_advantage = current.original
