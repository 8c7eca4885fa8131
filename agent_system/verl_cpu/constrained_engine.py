"""verl's FSDP language-model engine, recomputing log-probs under the rollout's grammar constraint.

Why: with `aflow_grammar` the CPU rollout samples each action token from the model's distribution masked
to the tokens the canvas grammar allows, and reports that token's log-prob under the masked distribution
(`agent_system.constrained`). verl's actor recomputes `old_log_prob` / the PPO ratio / the reference
log-prob with a plain `log_softmax`, which would put every ratio off by the allowed mass. This engine
subtracts log Σ_{a allowed(state)} π(a) (`log_allowed_mass`) at exactly the constrained positions, with
gradients through it, so the actor's policy is the constrained one the rollout sampled from.

The constraint comes with each sample as two non-tensor fields the agent loop puts in `extra_fields`
(verl carries them to the engine as NonTensorStacks, read with `verl.utils.tensordict_utils.get`):
`constraint_grammar` (a grammar name, "" when none) and `constraint_states` (the DFA state before each
response token, -1 for environment tokens). Without them (or all "") it is verl's engine unchanged.

Position alignment (verl 0.9.1, `pad_mode` NO_PADDING, see `response_positions`): a sample is its valid
prompt tokens followed by its response tokens (`left_right_2_no_padding`); the output at sample position i
scores token i + 1, so response token j of a sample of length L with R response tokens is scored at
L - R + j - 1 (verl's `no_padding_2_padding` slices the same). With `use_remove_padding` the logits are
packed [1, total(+pad_size at the tail), V] with a per-token temperature (`temperature_rmpad`); without,
they are [batch, max_len, V] with a per-sample temperature. Ulysses sequence parallelism (sharded logits)
and fused kernels (no logits) are refused when a batch carries a constraint.
"""

from __future__ import annotations

import torch
from verl.utils import tensordict_utils as tu
from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead

from agent_system.constrained import log_allowed_mass, token_constraint

STATES_KEY = "constraint_states"
GRAMMAR_KEY = "constraint_grammar"


def response_positions(seq_lens, states_per_sample) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The constrained response tokens of a batch: (sample, position in the sample whose output scores the
    token, that position in the packed sequence, the state before the token), only where state >= 0.
    `states_per_sample[i]` covers the last len(...) tokens of sample i (its response)."""
    sample, local, flat, states = [], [], [], []
    offset = 0
    for i, (length, sample_states) in enumerate(zip(seq_lens, states_per_sample, strict=True)):
        length, count = int(length), len(sample_states)
        if count and length - count < 1:
            raise ValueError(f"sample {i}: {count} constraint states for a sequence of {length} tokens "
                             "(the prompt must keep at least one token)")
        for j, state in enumerate(sample_states):
            if state >= 0:
                position = length - count + j - 1
                sample.append(i)
                local.append(position)
                flat.append(offset + position)
                states.append(int(state))
        offset += length
    as_long = lambda values: torch.tensor(values, dtype=torch.long)  # noqa: E731
    return as_long(sample), as_long(local), as_long(flat), as_long(states)


def constraint_correction(logits: torch.Tensor, temperature: torch.Tensor, seq_lens, states_per_sample, grammars,
                          tokenizer, packed: bool) -> torch.Tensor | None:
    """Per packed position (sum(seq_lens),): the log allowed mass to subtract from verl's log-probs; None when
    no sample is constrained.

    packed: logits [1, total(+pad), V] and temperature [total(+pad)] (use_remove_padding); else logits
    [batch, max_len, V] and temperature [batch]."""
    grammars = [g or "" for g in grammars]
    if not any(grammars):
        return None
    total = sum(int(n) for n in seq_lens)
    correction = None
    for name in sorted(set(grammars) - {""}):
        chosen = [states if g == name else [] for g, states in zip(grammars, states_per_sample, strict=True)]
        sample, local, flat, states = response_positions(seq_lens, chosen)
        if flat.numel() == 0:
            continue
        if packed:
            rows = logits.squeeze(0)[flat.to(logits.device)]
            temp = temperature.reshape(-1)[flat.to(temperature.device)]
        else:
            rows = logits[sample.to(logits.device), local.to(logits.device)]
            temp = temperature.reshape(-1)[sample.to(temperature.device)]
        rows = rows / temp.to(rows.device).clamp(min=1e-8).unsqueeze(-1).to(rows.dtype)
        constraint = token_constraint(tokenizer, name, int(rows.shape[-1]))
        mass = log_allowed_mass(rows, states, constraint)
        part = torch.zeros(total, dtype=mass.dtype, device=mass.device).index_put((flat.to(mass.device),), mass)
        correction = part if correction is None else correction + part
    return correction


class ConstrainedFSDPEngineWithLMHead(FSDPEngineWithLMHead):
    """`FSDPEngineWithLMHead` whose log-probs are those of the grammar-constrained policy (module docstring)."""

    def prepare_model_outputs(self, output, output_args, micro_batch, logits_processor_func):
        model_output = super().prepare_model_outputs(output, output_args, micro_batch, logits_processor_func)
        grammars = tu.get(micro_batch, GRAMMAR_KEY)
        log_probs = model_output.get("log_probs")
        if not grammars or not any(grammars) or log_probs is None:
            return model_output
        states = tu.get(micro_batch, STATES_KEY)
        if tu.get_non_tensor_data(data=micro_batch, key="use_fused_kernels", default=False):
            raise NotImplementedError("constrained log-probs need the logits: turn off use_fused_kernels")
        if getattr(self, "use_ulysses_sp", False):
            raise NotImplementedError("constrained log-probs do not support Ulysses sequence parallelism")
        packed = tu.get_non_tensor_data(data=micro_batch, key="use_remove_padding", default=True)
        temperature = output_args["temperature_rmpad"] if packed else output_args["temperature"]
        offsets = micro_batch["input_ids"].offsets()
        correction = constraint_correction(output.logits, temperature, offsets.diff().tolist(), states, grammars,
                                           self.model_config.tokenizer, packed)
        if correction is None:
            return model_output
        values = log_probs.values()
        corrected = values - correction.to(device=values.device, dtype=values.dtype)
        model_output["log_probs"] = torch.nested.nested_tensor_from_jagged(corrected, offsets)
        return model_output
