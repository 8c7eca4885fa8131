"""A verl checkpoint -> a standard Hugging Face model directory (safetensors, config, tokenizer, chat template).

verl 0.9.1 saves the FSDP actor as `global_step_N/actor/`: sharded `model_world_size_W_rank_R.pt` files,
`fsdp_config.json` (W) and `huggingface/` (config, tokenizer, chat template; no weights). Nothing serves that.
`export` finds the actor directory, checks it is complete (one line naming what is missing), merges the shards
with verl's own model merger (`verl.model_merger`, FSDP backend), and folds LoRA into the base weights: verl's
merger writes a LoRA run as base weights plus a separate `lora_adapter/`, and a `save_lora_only` checkpoint
holds the adapter alone, which needs the base model it was trained from. The result is written next to its
destination and renamed into place, so a crash never leaves a half-written model, and carries
`aflow_policy.json` (which checkpoint, which step, what the run trained: the provenance a search records).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from aflow.plugins import PluginError

RUN_RECORD = "aflow_run.json"  # written by recipes/train.py beside each global_step_N/actor
POLICY_RECORD = "aflow_policy.json"  # written by `export` into the model directory


class CheckpointError(PluginError):
    """A directory that is not a usable checkpoint; the message is the one line a user sees."""


@dataclass(frozen=True)
class Checkpoint:
    step_dir: Path  # global_step_N
    actor_dir: Path  # global_step_N/actor
    step: int | None
    world_size: int
    run: dict  # aflow_run.json of the step (empty for a checkpoint of another trainer)

    @property
    def hf_dir(self) -> Path:
        return self.actor_dir / "huggingface"


def find_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """A run's checkpoint directory (its latest step), a `global_step_N` directory or its `actor/`."""
    path = Path(path).expanduser().resolve()
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    latest = path / "latest_checkpointed_iteration.txt"
    if latest.is_file():
        text = latest.read_text().strip()
        if not text.isdigit():
            raise CheckpointError(f"{latest} does not name a step ({text[:40]!r})")
        path = path / f"global_step_{text}"
        if not path.is_dir():
            raise CheckpointError(f"{latest} names step {text}, but {path} is missing")
    if (path / "actor").is_dir():
        actor = path / "actor"
    elif (path / "fsdp_config.json").is_file() or path.name == "actor":
        actor = path
    else:
        raise CheckpointError(
            f"{path} is not a verl checkpoint: expected a run's checkpoint directory (with "
            "latest_checkpointed_iteration.txt), a global_step_N directory or its actor/ directory")
    config = actor / "fsdp_config.json"
    if not config.is_file():
        raise CheckpointError(f"incomplete checkpoint {actor}: no fsdp_config.json (was the save interrupted?)")
    try:
        world_size = int(json.loads(config.read_text())["world_size"])
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"incomplete checkpoint {actor}: fsdp_config.json has no world_size ({exc})") from None
    missing = [r for r in range(world_size) if not (actor / f"model_world_size_{world_size}_rank_{r}.pt").is_file()]
    if missing:
        raise CheckpointError(f"incomplete checkpoint {actor}: the model shards of rank(s) "
                              f"{', '.join(map(str, missing))} of {world_size} are missing")
    if not (actor / "huggingface" / "config.json").is_file():
        raise CheckpointError(f"incomplete checkpoint {actor}: no huggingface/config.json (verl saves the base "
                              "model's config and tokenizer there; the base model cannot be rebuilt without it)")
    step_dir = actor.parent
    match = re.fullmatch(r"global_step_(\d+)", step_dir.name)
    run_file = step_dir / RUN_RECORD
    run = json.loads(run_file.read_text()) if run_file.is_file() else {}
    return Checkpoint(step_dir, actor, int(match.group(1)) if match else None, world_size, run)


def is_model_dir(path: str | os.PathLike[str]) -> bool:
    """A Hugging Face model directory with weights (what `export` writes, or any such model)."""
    path = Path(path)
    weights = any(path.glob("*.safetensors")) or any(path.glob("pytorch_model*.bin"))
    return (path / "config.json").is_file() and weights


def export(checkpoint: str | os.PathLike[str], out: str | os.PathLike[str], *, base_model: str | None = None,
           overwrite: bool = False) -> Path:
    """Write the checkpoint's policy to `out` as a Hugging Face model directory; return `out`."""
    ckpt = find_checkpoint(checkpoint)
    out = Path(out).expanduser().resolve()
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise CheckpointError(f"{out} already exists and is not empty (pass --overwrite to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        lora = _merge_shards(ckpt, staging, base_model)
        record = {"checkpoint": str(ckpt.step_dir), "step": ckpt.step, "lora": lora,
                  "exported_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "run": ckpt.run}
        (staging / POLICY_RECORD).write_text(json.dumps(record, indent=1))
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def _merge_shards(ckpt: Checkpoint, target: Path, base_model: str | None) -> str:
    """verl's merger into `target`, then LoRA folded in; returns how LoRA was handled ("none" or "merged")."""
    import torch

    shard = torch.load(ckpt.actor_dir / f"model_world_size_{ckpt.world_size}_rank_0.pt", map_location="cpu",
                       weights_only=False)
    lora_only = bool(shard) and all("lora_" in k or ".adapter_" in k for k in shard)
    del shard
    if lora_only:
        base = _base_model(ckpt, base_model)
        adapter_only = target / "verl-merge"
        _run_verl_merger(ckpt, adapter_only, allow_failure=True)  # its adapter, however it saves the rest
        adapter = adapter_only / "lora_adapter"
        if not (adapter / "adapter_model.safetensors").is_file():
            raise CheckpointError(f"{ckpt.actor_dir} holds only LoRA weights, and verl's merger wrote no adapter")
        _fold_lora(base, adapter, target, ckpt.hf_dir)
        shutil.rmtree(adapter_only)
        return "merged"
    _run_verl_merger(ckpt, target)
    adapter = target / "lora_adapter"
    if adapter.is_dir():
        folded = target.with_name(target.name + "-folded")
        _fold_lora(target, adapter, folded, ckpt.hf_dir)
        shutil.rmtree(target)
        os.replace(folded, target)
        return "merged"
    return "none"


def _base_model(ckpt: Checkpoint, base_model: str | None) -> Path:
    candidates = [base_model, ckpt.run.get("model_path")]
    for candidate in filter(None, candidates):
        if is_model_dir(candidate):
            return Path(candidate)
    tried = ", ".join(str(c) for c in filter(None, candidates)) or "none recorded"
    raise CheckpointError(f"{ckpt.actor_dir} holds only LoRA weights and the base model it was trained from is "
                          f"missing (tried: {tried}); pass --base-model DIR")


def _run_verl_merger(ckpt: Checkpoint, target: Path, allow_failure: bool = False) -> None:
    from verl.model_merger.base_model_merger import ModelMergerConfig
    from verl.model_merger.fsdp_model_merger import FSDPModelMerger

    target.mkdir(parents=True, exist_ok=True)
    config = ModelMergerConfig(operation="merge", backend="fsdp", target_dir=str(target),
                               local_dir=str(ckpt.actor_dir), hf_model_config_path=str(ckpt.hf_dir))
    log = io.StringIO()
    logging.getLogger("torch.distributed.device_mesh").setLevel(logging.ERROR)  # a warning per shard, harmless
    try:
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):  # its progress bars and prints
            FSDPModelMerger(config).merge_and_save()
    except Exception as exc:
        if allow_failure:
            return
        last = (log.getvalue().strip().splitlines() or [""])[-1]
        raise CheckpointError(f"verl's model merger failed on {ckpt.actor_dir}: {type(exc).__name__}: "
                              f"{' '.join(str(exc).split())[:300]} {last[:200]}".strip()) from exc


def _fold_lora(base: Path, adapter: Path, target: Path, tokenizer_dir: Path) -> None:
    """base + adapter -> one model with W + (alpha / r) B A in place of each adapted weight (peft's merge)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    merged.save_pretrained(target)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(target)


def describe(ckpt: Checkpoint) -> dict:
    return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(ckpt).items()}
