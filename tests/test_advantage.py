"""GRPO and Workflow-GiGPO advantages, and the hook on verl's classic-trainer `compute_advantage` (CPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from verl.protocol import DataProto
from verl.trainer.config import AlgoConfig
from verl.trainer.ppo import core_algos, ray_trainer

from agent_system.advantage import (
    WORKFLOW_GIGPO,
    compute_workflow_gigpo_advantage,
    discounted_returns,
    install_advantage_hook,
    uninstall_advantage_hook,
)
from agent_system.config import GiGPOConfig

ORIGINAL_COMPUTE_ADVANTAGE = ray_trainer.compute_advantage  # verl's, captured before any test installs the hook
EPS = 1e-6


@pytest.fixture
def hook():
    assert ray_trainer.compute_advantage is ORIGINAL_COMPUTE_ADVANTAGE
    yield install_advantage_hook
    uninstall_advantage_hook()
    assert ray_trainer.compute_advantage is ORIGINAL_COMPUTE_ADVANTAGE


def objects(values) -> np.ndarray:
    """A 1-D object array, one entry per row, filled the way verl's agent loop fills extra_fields columns."""
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


# ------------------------------------------------------------------------------------------- GRPO


def test_grpo_hand_worked_matches_verl():
    # 2 uids x 3 episodes, rows interleaved p, q, p, q, p, q; the score sits on a different token per row.
    # uid p: scores 1, 0, 0   -> mean 1/3, deviations 2/3, -1/3, -1/3, sum of squares 2/3,
    #        unbiased var (2/3)/2 = 1/3, std 0.5773503 -> adv (2/3)/(0.5773503+1e-6) = 1.1546985,
    #        (-1/3)/(0.5773503+1e-6) = -0.5773493
    # uid q: scores 0.5, 1, 1.5 -> mean 1, deviations -0.5, 0, 0.5, unbiased var 0.5/2 = 0.25, std 0.5
    #        -> adv -0.5/(0.5+1e-6) = -0.999998, 0, 0.999998
    index = np.array(["p", "q", "p", "q", "p", "q"], dtype=object)
    scores = [1.0, 0.5, 0.0, 1.0, 0.0, 1.5]
    lengths = [4, 3, 2, 4, 1, 3]
    mask = torch.zeros(6, 4)
    rewards = torch.zeros(6, 4)
    for i, (score, n) in enumerate(zip(scores, lengths, strict=True)):
        mask[i, :n] = 1
        rewards[i, n - 1] = score
    per_row = torch.tensor([1.1546985, -0.999998, -0.5773493, 0.0, -0.5773493, 0.999998])
    expected = per_row[:, None] * mask

    advantages, returns = core_algos.compute_grpo_outcome_advantage(rewards, mask, index)

    assert torch.allclose(advantages, expected, atol=1e-6)  # verl's GRPO, pinned by hand-computed values
    assert torch.equal(returns, advantages)


# ---------------------------------------------------------------------------------- Workflow-GiGPO

# One uid, 2 episodes x 2 turns, response length 8.
#   episode 0: mask 1 1 1 0 0 1 1 0, turns [0,4) and [5,7), anchors A, B0, step rewards 0.1, 0.9, score 1
#              (token 3 is inside turn 0's span but masked: it stays 0)
#   episode 1: mask 1 1 0 0 1 1 1 1, turns [0,2) and [4,7), anchors A, B1, step rewards 0.3, 0.0, score 0
#              (token 7 is a policy token outside every turn span: episode advantage only)
# gamma 0.5, w 0.5, epsilon 1e-6.
# Episode advantage: scores 1, 0 -> mean 0.5, unbiased std sqrt(0.5) = 0.7071068
#   -> +-0.5/(0.7071068+1e-6) = +-0.7071058
# Returns: ep0 G0 = 0.1 + 0.5*0.9 = 0.55, G1 = 0.9; ep1 G0 = 0.3 + 0.5*0.0 = 0.3, G1 = 0.0
# Step group A = {0.55, 0.3}: mean 0.425, unbiased std 0.25/sqrt(2) = 0.1767767
#   -> +-0.125/(0.1767767+1e-6) = +-0.7071028
# Step groups B0, B1 are singletons -> step advantage 0.
# Tokens: ep0 turn 0: 0.7071058 + 0.5*0.7071028 = 1.0606572; ep0 turn 1: 0.7071058
#         ep1 turn 0: -1.0606572; ep1 turn 1 and token 7: -0.7071058; masked tokens 0.
# (Population std would give +-1 and +-1; no discount would rank ep1's first turn above ep0's.)
GIGPO_MASK = torch.tensor([[1, 1, 1, 0, 0, 1, 1, 0], [1, 1, 0, 0, 1, 1, 1, 1]], dtype=torch.float32)
GIGPO_REWARDS = torch.tensor([[0, 0, 0, 0, 0, 0, 1.0, 0], [0] * 8], dtype=torch.float32)
GIGPO_UID = ["u", "u"]
GIGPO_SPANS = [[[0, 4], [5, 7]], [[0, 2], [4, 7]]]
GIGPO_ANCHORS = [["A", "B0"], ["A", "B1"]]
GIGPO_STEP_REWARDS = [[0.1, 0.9], [0.3, 0.0]]
GIGPO_SETTINGS = GiGPOConfig(step_advantage_w=0.5, gamma=0.5, epsilon=EPS)
GIGPO_EXPECTED = torch.tensor(
    [
        [1.0606572, 1.0606572, 1.0606572, 0, 0, 0.7071058, 0.7071058, 0],
        [-1.0606572, -1.0606572, 0, 0, -0.7071058, -0.7071058, -0.7071058, -0.7071058],
    ]
)


def test_discounted_returns():
    # 3 + 0 = 3; 2 + 0.5*3 = 3.5; 1 + 0.5*3.5 = 2.75
    assert discounted_returns([1.0, 2.0, 3.0], 0.5) == pytest.approx([2.75, 3.5, 3.0])


def test_gigpo_hand_worked():
    advantages, returns = compute_workflow_gigpo_advantage(
        GIGPO_REWARDS,
        GIGPO_MASK,
        np.array(GIGPO_UID, dtype=object),
        GIGPO_SPANS,
        GIGPO_ANCHORS,
        GIGPO_STEP_REWARDS,
        step_advantage_w=0.5,
        gamma=0.5,
        epsilon=EPS,
    )
    assert advantages.shape == GIGPO_MASK.shape
    assert torch.allclose(advantages, GIGPO_EXPECTED, atol=1e-6)
    assert torch.equal(returns, advantages)


def test_an_invalid_action_gets_a_negative_step_advantage_at_a_workflow_where_edits_lost():
    """Issue 13, defect 8: one uid, one anchor; a valid turn whose edit lowered the score by 0.05 and
    an invalid one. Without a step-level penalty the invalid turn's step return (0) beats the valid
    one's (-0.05): step parts -0.707 / +0.707, and with the episode parts (-0.05 vs -0.1 format
    penalty: +0.707 / -0.707) the totals were 0 / 0. The penalty, charged at its own step after
    discounting (as verl-agent), makes the invalid turn the worse one at both levels."""
    from agent_system.config import RewardConfig
    from agent_system.reward import step_penalty

    penalty = RewardConfig().format_penalty
    mask = torch.ones(2, 4)
    rewards = torch.zeros(2, 4)
    rewards[0, -1], rewards[1, -1] = -0.05, -penalty  # episode returns: the edit's loss, the format penalty
    spans, anchors, step_rewards = [[[0, 4]], [[0, 4]]], [["a"], ["a"]], [[-0.05], [0.0]]
    penalties = [[step_penalty({"valid": True}, RewardConfig())], [step_penalty({"valid": False}, RewardConfig())]]
    assert penalties == [[0.0], [penalty]]
    uid = np.array(["u", "u"], dtype=object)

    before, _ = compute_workflow_gigpo_advantage(rewards, mask, uid, spans, anchors, step_rewards,
                                                 step_advantage_w=1.0, gamma=0.95, epsilon=EPS)
    assert before[0, 0].item() == pytest.approx(0.0, abs=1e-4)  # the defect, as the review found it
    assert before[1, 0].item() == pytest.approx(0.0, abs=1e-4)

    after, _ = compute_workflow_gigpo_advantage(rewards, mask, uid, spans, anchors, step_rewards,
                                                step_advantage_w=1.0, gamma=0.95, epsilon=EPS,
                                                step_penalties=penalties)
    assert after[0, 0].item() == pytest.approx(2 * 0.7071, abs=1e-3)  # valid: better episode, better step
    assert after[1, 0].item() == pytest.approx(-2 * 0.7071, abs=1e-3)


def test_gigpo_groups_by_uid_and_rows_without_turns():
    # Same anchor "A" under two different uids: two singleton step groups, so step advantage 0 everywhere and
    # the result is plain GRPO. A row with no per-turn data (None) gets its episode advantage only.
    mask = torch.ones(4, 3)
    rewards = torch.zeros(4, 3)
    rewards[[0, 2], 2] = 1.0
    index = np.array(["x", "x", "y", "y"], dtype=object)
    advantages, _ = compute_workflow_gigpo_advantage(
        rewards,
        mask,
        index,
        [[[0, 3]], None, [[0, 3]], [[0, 3]]],
        [["A"], None, ["A"], ["B"]],
        [[1.0], None, [0.0], [5.0]],
        step_advantage_w=1.0,
    )
    grpo, _ = core_algos.compute_grpo_outcome_advantage(rewards, mask, index)
    assert torch.allclose(advantages, grpo)


@pytest.mark.parametrize(
    "spans, anchors, step_rewards, message",
    [
        ([[0, 2], [2, 4]], ["A"], [0.0, 0.0], "must be equal"),  # lengths differ
        ([[0, 3], [2, 4]], ["A", "B"], [0.0, 0.0], "non-overlapping"),  # overlapping spans
        ([[0, 2], [2, 4]], None, [0.0, 0.0], "are None"),  # partly missing
    ],
)
def test_gigpo_rejects_bad_turn_data(spans, anchors, step_rewards, message):
    with pytest.raises(ValueError, match=message):
        compute_workflow_gigpo_advantage(
            torch.zeros(2, 4), torch.ones(2, 4), ["u", "u"], [spans, [[0, 4]]], [anchors, ["A"]], [step_rewards, [0.0]]
        )


# ------------------------------------------------------------------------------------------- hook


def gigpo_data(object_columns: str = "filled") -> DataProto:
    """The hand-worked GiGPO batch as a verl DataProto (fresh tensors each call)."""
    if object_columns == "filled":  # as verl's agent loop builds extra_fields columns
        non_tensors = {
            "uid": objects(GIGPO_UID),
            "turn_spans": objects(GIGPO_SPANS),
            "anchors": objects(GIGPO_ANCHORS),
            "step_rewards": objects(GIGPO_STEP_REWARDS),
        }
    else:  # np.array(..., dtype=object) of equal-length lists makes multi-dimensional object arrays
        non_tensors = {
            "uid": np.array(GIGPO_UID, dtype=object),
            "turn_spans": np.array(GIGPO_SPANS, dtype=object),
            "anchors": np.array(GIGPO_ANCHORS, dtype=object),
            "step_rewards": np.array(GIGPO_STEP_REWARDS, dtype=object),
        }
    return DataProto.from_single_dict(
        {
            "responses": torch.arange(16).reshape(2, 8),
            "response_mask": GIGPO_MASK.clone(),
            "token_level_rewards": GIGPO_REWARDS.clone(),
            **non_tensors,
        }
    )


@pytest.mark.parametrize("object_columns", ["filled", "ndarray"])
def test_hook_workflow_gigpo(hook, object_columns):
    hook({"env": {"gigpo": {"step_advantage_w": 0.5, "gamma": 0.5, "epsilon": EPS}}})
    data = ray_trainer.compute_advantage(gigpo_data(object_columns), adv_estimator=WORKFLOW_GIGPO, config=AlgoConfig())
    assert torch.allclose(data.batch["advantages"], GIGPO_EXPECTED, atol=1e-6)
    assert torch.allclose(data.batch["returns"], GIGPO_EXPECTED, atol=1e-6)


def test_hook_reads_env_gigpo_from_trainer_config(hook):
    # No settings at install: the wrapper reads env.gigpo from the trainer config that `config=`
    # (self.config.algorithm in RayPPOTrainer.fit) belongs to; algorithm.gamma (GAE's) is not used.
    hook()
    trainer_config = OmegaConf.create(
        {
            "algorithm": {"adv_estimator": WORKFLOW_GIGPO, "gamma": 1.0, "lam": 1.0},
            "env": {"gigpo": {"step_advantage_w": 0.5, "gamma": 0.5, "epsilon": EPS}},
        }
    )
    data = ray_trainer.compute_advantage(
        gigpo_data(),
        adv_estimator=trainer_config.algorithm.adv_estimator,
        gamma=trainer_config.algorithm.gamma,
        lam=trainer_config.algorithm.lam,
        config=trainer_config.algorithm,
    )
    assert torch.allclose(data.batch["advantages"], GIGPO_EXPECTED, atol=1e-6)


def test_hook_gamma_matters_in_a_three_member_step_group(hook):
    # One uid, 3 episodes with equal scores (episode advantage 0: std 0 -> 0/(0+1e-6)), response length 4,
    # turns [0,2) and [2,4); first turns share anchor S, second turns are singletons (step advantage 0).
    # step rewards e0 [0, 1], e1 [0.5, 0], e2 [0, 0]; gamma 0.5 -> G0 = 0.5, 0.5, 0
    #   mean 1/3, deviations 1/6, 1/6, -1/3, sum of squares 1/6, unbiased var 1/12, std 0.2886751
    #   -> 0.1666667/(0.2886751+1e-6) = 0.5773483, 0.5773483, -0.3333333/0.2886761 = -1.1546966
    # w 0.5 -> turn-0 tokens 0.2886742, 0.2886742, -0.5773483. (gamma 0.95 would give G0 = 0.95, 0.5, 0.)
    hook(GiGPOConfig(step_advantage_w=0.5, gamma=0.5, epsilon=EPS))
    data = DataProto.from_single_dict(
        {
            "responses": torch.zeros(3, 4, dtype=torch.long),
            "response_mask": torch.ones(3, 4),
            "token_level_rewards": torch.zeros(3, 4),
            "uid": objects(["g", "g", "g"]),
            "turn_spans": objects([[[0, 2], [2, 4]]] * 3),
            "anchors": objects([["S", "T0"], ["S", "T1"], ["S", "T2"]]),
            "step_rewards": objects([[0.0, 1.0], [0.5, 0.0], [0.0, 0.0]]),
        }
    )
    data = ray_trainer.compute_advantage(data, adv_estimator=WORKFLOW_GIGPO, config=AlgoConfig())
    expected = torch.tensor([[0.2886742] * 2 + [0, 0], [0.2886742] * 2 + [0, 0], [-0.5773483] * 2 + [0, 0]])
    assert torch.allclose(data.batch["advantages"], expected, atol=1e-6)


def test_hook_defaults_to_gigpo_config(hook):
    # Defaults w 1.0, gamma 0.95: ep0 G0 = 0.1 + 0.95*0.9 = 0.955, ep1 G0 = 0.3 -> still +-0.7071 after
    # normalization (two members), so turn 0 tokens get +-(0.7071058 + 1.0*0.70710...) = +-1.41421.
    hook()
    data = ray_trainer.compute_advantage(gigpo_data(), adv_estimator=WORKFLOW_GIGPO, config=AlgoConfig())
    step = 0.655 / 2 / (0.655 / 2**0.5 + EPS)
    expected = GIGPO_EXPECTED.clone()
    expected[0, :3] = 0.7071058 + step
    expected[1, :2] = -0.7071058 - step
    assert torch.allclose(data.batch["advantages"], expected, atol=1e-6)
    assert abs(expected[0, 0].item() - 1.4142) < 1e-3


def test_hook_grpo_delegates_and_install_is_idempotent(hook):
    index = np.array(["p", "q", "p", "q"], dtype=object)

    def grpo_data() -> DataProto:
        rewards = torch.tensor([[0, 1.0], [0, 0.2], [0, 0.0], [0, 0.7]])
        return DataProto.from_single_dict(
            {
                "responses": torch.zeros(4, 2, dtype=torch.long),
                "response_mask": torch.tensor([[1, 1], [1, 1], [1, 0], [1, 1]], dtype=torch.float32),
                "token_level_rewards": rewards,
                "uid": index.copy(),
            }
        )

    unpatched = ORIGINAL_COMPUTE_ADVANTAGE(grpo_data(), adv_estimator="grpo", config=AlgoConfig())
    first = hook()
    patched = ray_trainer.compute_advantage(grpo_data(), adv_estimator="grpo", config=AlgoConfig())
    second = hook()
    again = ray_trainer.compute_advantage(grpo_data(), adv_estimator="grpo", config=AlgoConfig())

    assert second is first and ray_trainer.compute_advantage is first
    assert first.original is ORIGINAL_COMPUTE_ADVANTAGE  # one layer of wrapping, not two
    assert core_algos.get_adv_estimator_fn(WORKFLOW_GIGPO) is not None
    # each uid has scores {1, 0} / {0.2, 0.7}: +-0.5/(0.7071068+1e-6) and +-0.25/(0.3535534+1e-6)
    expected = torch.tensor([[0.7071058, 0.7071058], [-0.7071048, -0.7071048], [-0.7071058, 0], [0.7071048, 0.7071048]])
    for result in (patched, again):
        assert torch.equal(result.batch["advantages"], unpatched.batch["advantages"])
        assert torch.equal(result.batch["returns"], unpatched.batch["returns"])
    assert torch.allclose(unpatched.batch["advantages"], expected, atol=1e-6)

    hook({"env": {"gigpo": {"step_advantage_w": 0.5, "gamma": 0.5}}})  # a third install updates settings only
    data = ray_trainer.compute_advantage(gigpo_data(), adv_estimator=WORKFLOW_GIGPO, config=AlgoConfig())
    assert ray_trainer.compute_advantage is first
    assert torch.allclose(data.batch["advantages"], GIGPO_EXPECTED, atol=1e-6)


def test_hook_gae_delegates(hook):
    def gae_data() -> DataProto:
        return DataProto.from_single_dict(
            {
                "responses": torch.zeros(2, 3, dtype=torch.long),
                "response_mask": torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.float32),
                "token_level_rewards": torch.tensor([[0, 0, 1.0], [0, 0.5, 0]]),
                "values": torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]]),
                "uid": np.array(["a", "b"], dtype=object),
            }
        )

    unpatched = ORIGINAL_COMPUTE_ADVANTAGE(gae_data(), adv_estimator="gae", gamma=0.9, lam=0.8, config=AlgoConfig())
    hook({"env": {"gigpo": {"step_advantage_w": 0.5}}})
    patched = ray_trainer.compute_advantage(gae_data(), adv_estimator="gae", gamma=0.9, lam=0.8, config=AlgoConfig())
    assert torch.equal(patched.batch["advantages"], unpatched.batch["advantages"])
    assert torch.equal(patched.batch["returns"], unpatched.batch["returns"])
    # GAE returns are advantages + values, unlike GRPO's returns == advantages: the critic path really ran
    assert not torch.equal(patched.batch["returns"], patched.batch["advantages"])


def test_registered_estimator_without_hook_raises():
    install_advantage_hook()
    uninstall_advantage_hook()
    assert ray_trainer.compute_advantage is ORIGINAL_COMPUTE_ADVANTAGE
    with pytest.raises(RuntimeError, match="install_advantage_hook"):
        ORIGINAL_COMPUTE_ADVANTAGE(gigpo_data(), adv_estimator=WORKFLOW_GIGPO, config=AlgoConfig())


def test_group_diversity_is_added_to_the_reward_before_advantages():
    import numpy as np
    import torch
    from verl.protocol import DataProto

    from agent_system.advantage import apply_group_diversity

    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1]])
    rewards = torch.zeros(3, 3)
    data = DataProto.from_dict(
        tensors={"token_level_rewards": rewards.clone(), "response_mask": mask},
        non_tensors={"uid": np.array(["u", "u", "v"], dtype=object),
                     "final_operators": np.array([["Custom"], ["Custom", "ScEnsemble"], ["Custom"]], dtype=object)})
    apply_group_diversity(data, 2.0)
    # u: Jaccard distance 1/2 between the two, times 2.0 -> +1.0 at each last valid token; v is alone -> 0
    expected = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    assert torch.allclose(data.batch["token_level_rewards"], expected)
    apply_group_diversity(data, 0.0)  # weight 0: untouched
    assert torch.allclose(data.batch["token_level_rewards"], expected)


def test_verl_file_logger_records_are_read_back_and_a_failed_step_is_caught(tmp_path, monkeypatch):
    """tests/verl_log.py reads what verl's own file logger writes (the CPU and GPU trainer tests rely on it)."""
    from verl.utils.tracking import Tracking

    from tests.verl_log import assert_learning_step, logger_env, step_metrics

    path = tmp_path / "metrics.jsonl"
    for key, value in logger_env(path).items():
        monkeypatch.setenv(key, value)
    tracking = Tracking(project_name="p", experiment_name="e", default_backend=["file"])
    # verl's actor metrics are numpy scalars
    tracking.log({"actor/pg_loss": np.float64(-0.25), "actor/grad_norm": np.float64(1.5),
                  "critic/score/mean": 0.1}, step=1)
    tracking.log({"actor/pg_loss": float("nan"), "actor/grad_norm": 0.0}, step=2)
    tracking.logger["file"].finish()
    steps = step_metrics(path)
    assert steps[1] == {"actor/pg_loss": -0.25, "actor/grad_norm": 1.5, "critic/score/mean": 0.1}
    assert_learning_step(steps[1])
    with pytest.raises(AssertionError):
        assert_learning_step(steps[2])


def test_a_group_whose_episodes_all_scored_the_same_gets_no_advantage(hook):
    """Eight episodes of -0.1 (every answer rejected): verl's float32 mean is not exactly -0.1 and the rounding
    error over std + 1e-6 gave every token the same advantage of ~0.007 (seen in the rehearsal); the hook
    makes it 0 and leaves a group with a reward spread exactly as verl computes it."""

    def data() -> DataProto:
        rewards = torch.zeros(12, 2)
        rewards[:8, 1] = -0.1
        rewards[8:, 1] = torch.tensor([0.0, 1.0, 0.5, 0.25])
        return DataProto.from_single_dict({"responses": torch.zeros(12, 2, dtype=torch.long),
                                           "response_mask": torch.ones(12, 2), "token_level_rewards": rewards,
                                           "uid": objects(["flat"] * 8 + ["spread"] * 4)})

    unpatched = ORIGINAL_COMPUTE_ADVANTAGE(data(), adv_estimator="grpo", config=AlgoConfig())
    assert unpatched.batch["advantages"][:8].abs().max() > 1e-3  # the artefact this guards against
    hook()
    patched = ray_trainer.compute_advantage(data(), adv_estimator="grpo", config=AlgoConfig())
    assert torch.equal(patched.batch["advantages"][:8], torch.zeros(8, 2))
    assert torch.equal(patched.batch["advantages"][8:], unpatched.batch["advantages"][8:])
