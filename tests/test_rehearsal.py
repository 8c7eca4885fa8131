"""The production run rehearsed on CPU (configs/preset/cpu-rehearsal.yaml): what it may change, and the fit
itself (tests/fits.py `rehearsal_run`: `bash launch.sh preset=cpu-rehearsal` through `ray job submit` to a Ray
head of its own, then the same command again, which resumes)."""

from __future__ import annotations

import math
import re

from omegaconf import OmegaConf

from recipes.config import compose

PRODUCTION = "qwen2.5-7b-a100-80g"
REHEARSAL = "cpu-rehearsal"

# Every key the rehearsal may set differently from the production preset, by reason. Values are compared
# unresolved, so keys derived through interpolation (rollout.prompt_length from data.max_prompt_length, ...)
# follow their source and are not listed.
ALLOWED = {
    "device": {
        "trainer.device", "ray_kwargs.ray_init.num_cpus", "ray_kwargs.ray_init.num_gpus", "preflight.gpu_memory_gb",
        "actor_rollout_ref.model.override_config.attn_implementation", "actor_rollout_ref.actor.use_torch_compile",
        *(f"actor_rollout_ref.{role}.fsdp_config.mixed_precision.{key}" for role in ("actor", "ref")
          for key in ("param_dtype", "reduce_dtype", "buffer_dtype")),
    },
    "model path": {"actor_rollout_ref.model.path"},
    "rollout backend": {"actor_rollout_ref.rollout.name"},
    "executor": {"env.executor.base_url", "env.executor.max_tokens"},
    "sizes": {
        "data.train_batch_size", "data.max_prompt_length", "data.max_response_length",
        "actor_rollout_ref.actor.ppo_mini_batch_size", "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu",
        "actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu",
        "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu", "actor_rollout_ref.rollout.max_model_len",
        "actor_rollout_ref.rollout.max_num_batched_tokens", "actor_rollout_ref.rollout.max_num_seqs",
        "env.eval_subset_size", "env.feedback_size",
        "trainer.total_training_steps", "trainer.save_freq", "trainer.test_freq", "trainer.experiment_name",
    },
    # a random policy writes no valid workflow: no group has a reward spread (named in the preset)
    "health guard threshold": {"env.health.flat_steps"},
}


def _leaves(node, prefix: str = "") -> dict[str, object]:
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            out.update(_leaves(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: node}


def _preset(name: str) -> dict[str, object]:
    return _leaves(OmegaConf.to_container(compose([f"preset={name}"]), resolve=False))


def test_the_rehearsal_differs_from_the_production_preset_only_in_the_allow_list():
    production, rehearsal = _preset(PRODUCTION), _preset(REHEARSAL)
    absent = object()
    changed = {key for key in production.keys() | rehearsal.keys()
               if production.get(key, absent) != rehearsal.get(key, absent)}
    allowed = set().union(*ALLOWED.values())
    assert changed - allowed == set(), "the rehearsal changes keys outside the allow-list"
    assert allowed - changed == set(), "allow-listed keys the rehearsal no longer changes: drop them from the list"


def test_the_rehearsal_keeps_what_production_runs():
    config = compose([f"preset={REHEARSAL}"])
    assert config.env.mode == "task" and config.env.action_space == "code"
    assert config.actor_rollout_ref.actor.use_kl_loss and config.algorithm.adv_estimator == "grpo"
    assert config.actor_rollout_ref.rollout.n == compose([f"preset={PRODUCTION}"]).actor_rollout_ref.rollout.n == 8
    assert config.actor_rollout_ref.rollout.agent.num_workers >= 2 and config.env.num_workers >= 2
    assert config.trainer.test_freq > 0 and config.trainer.save_freq > 0 and config.trainer.resume_mode == "auto"


# ---- the rehearsal fit (tests/fits.py `rehearsal_run`) ---------------------------------------------------------


def _updated(metrics: dict[str, float]) -> None:
    """verl ran the update: finite policy and KL losses and gradient norm. The gradient itself is 0 here and
    that is right: every answer of a random policy is rejected (-0.1), so no group has a reward spread
    (agent_system.advantage.zero_flat_groups), and the policy still equals the reference."""
    for key in ("actor/pg_loss", "actor/kl_loss", "actor/grad_norm"):
        assert key in metrics and math.isfinite(metrics[key]), (key, metrics)


def _step_lines(output: str) -> dict[int, str]:
    return {int(m.group(1)): m.group(0) for m in re.finditer(r"step (\d+): reward .*", output)}


def test_the_rehearsal_runs_the_production_path_through_ray_job_submit(rehearsal_run):
    first = rehearsal_run.first
    assert re.search(r"\[launch\] job aflow-rl-\S+ submitted", first.output), first.output[-3000:]
    assert "did not succeed" in first.output  # the killed job, as launch.sh reports it
    assert "[launch] built task data" in first.output  # launch.sh built the missing task data
    assert "job" in rehearsal_run.killed, first.output[-3000:]  # killed during step 2, after step 1's checkpoint
    _updated(first.metrics[1])  # with the reference model and the KL loss
    # GRPO groups of the preset's rollout.n: 2 tasks x 8 episodes, no episode failed
    assert "groups with a reward spread: 0/2; failed episodes: 0" in _step_lines(first.output)[1]
    assert len(set(re.findall(r"AgentLoopWorker pid=(\d+)", first.output))) >= 2
    validation = [k for k in first.metrics[0] if k.startswith("val-core/")]
    assert validation and all(math.isfinite(first.metrics[0][k]) for k in first.metrics[0] if k.startswith("val-"))
    searches = sorted(p.stem for p in (rehearsal_run.checkpoint_dir / "global_step_1" / "env" / "search").glob("*.pkl"))
    assert len(searches) >= 2, searches  # benchmarks routed to different AFlow workers


def test_launching_again_resumes_the_killed_job_from_its_checkpoint_and_environment(rehearsal_run):
    resumed = rehearsal_run.resumed
    resumed.check()
    assert re.search(r"\[launch\] job aflow-rl-\S+ succeeded", resumed.output)
    ckpt = rehearsal_run.checkpoint_dir
    restored = re.search(r"environment: restored from (\S+) \(searches: ([^)]*)\)", resumed.output)
    assert restored and restored.group(1) == str(ckpt / "global_step_1" / "env"), resumed.output[-3000:]
    saved = sorted(p.stem for p in (ckpt / "global_step_1" / "env" / "search").glob("*.pkl"))
    assert restored.group(2).split(", ") == saved
    assert sorted(_step_lines(resumed.output)) == [2, 3]  # from the saved step 1: step 2 again, then 3
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "3"
    assert (ckpt / "global_step_3" / "env" / "search").is_dir()


def test_a_killed_environment_worker_fails_only_its_episodes_and_the_next_step_is_normal(rehearsal_run):
    """The worker dies with episodes in flight during step 2: its training rollout or its validation (the
    watcher kills whichever worker Ray's task events show busy first; the training rollout can be over in
    seconds). Those episodes fail and are masked, every other one of the step counts, step 3 is normal."""
    resumed = rehearsal_run.resumed
    resumed.check()
    assert "worker" in rehearsal_run.killed, (rehearsal_run.killed, resumed.output[-2000:])
    lines = _step_lines(resumed.output)
    failed = {s: int(re.search(r"failed episodes: (\d+)", line).group(1)) for s, line in lines.items()}
    val_failed = {step: {k.split("/")[2]: v for k, v in resumed.metrics[step].items()
                         if k.startswith("val-aux/aflow/") and "/failed_episodes/" in k} for step in (2, 3)}
    assert val_failed[2] and val_failed[3], resumed.metrics[2]
    assert failed[2] >= 1 or any(v > 0 for v in val_failed[2].values()), (lines[2], val_failed[2])
    assert failed[2] < 16, lines[2]  # the other workers' training episodes trained
    assert any(v == 0 for v in val_failed[2].values()), val_failed[2]  # and their validation episodes counted
    assert failed[3] == 0 and not any(val_failed[3].values()), (lines[3], val_failed[3])  # created again
    for step in (2, 3):
        _updated(resumed.metrics[step])
        assert all(math.isfinite(v) for k, v in resumed.metrics[step].items() if k.startswith("val-"))
