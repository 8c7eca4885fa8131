"""Decoding that always parses: the canvas grammar over SmolLM2's tokens, the CPU server sampling under it,
and the trainer's recomputation (verl's FSDP engine code with our override) giving the rollout's log-probs.

One module-scoped batch of generations (a GRPO-group-sized batch at temperature 1.0 and a few at 2.0) is
shared by the tests; generations are capped at MAX_TOKENS tokens, so an action cut there is a prefix of the
language rather than a whole line (the only way an action can fail to parse).
"""

from __future__ import annotations

import asyncio
import copy
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from verl.utils import normalize_token_ids

from aflow.canvas import Action, parse
from agent_system.agent_loop.cpu_server import CPUServerManager
from agent_system.constrained import TokenConstraint, log_allowed_mass, token_constraint

TOLERANCE = 1e-4
MAX_TOKENS = 24
GRAMMAR = "canvas-answer"


def constrained_log_probs(logits: torch.Tensor, labels: torch.Tensor, states: torch.Tensor,
                          constraint: TokenConstraint) -> torch.Tensor:
    """log π_c(label) per row: log_softmax(logits)[label] − log_allowed_mass (rows with state < 0: the
    plain log-prob). logits [N, V] temperature-scaled, labels [N], states [N]."""
    plain = torch.log_softmax(logits.float(), dim=-1).gather(-1, labels.view(-1, 1).long()).squeeze(-1)
    return plain - log_allowed_mass(logits, states, constraint)  # the reference the engine is checked against


@pytest.fixture(scope="module")
def constraint(policy):
    _, tokenizer = policy
    return token_constraint(tokenizer, GRAMMAR)


@pytest.fixture(scope="module")
def server(policy):
    model, tokenizer = policy
    return CPUServerManager(model=model, tokenizer=tokenizer, max_batch_size=24)


@pytest.fixture(scope="module")
def prompt_ids(policy):
    _, tokenizer = policy
    # short, so the forward passes stay cheap on a shared 2-core machine; the grammar does the rest
    content = ('Workflow: 1. ANSWER "Solve step by step." Reply with one action, such as ADD REVIEW, '
               'ENSEMBLE 1 3, SET_PROMPT 1 "Be brief." or FINISH.')
    return normalize_token_ids(tokenizer.apply_chat_template([{"role": "user", "content": content}],
                                                             add_generation_prompt=True, tokenize=True))


def _params(temperature: float, seed: int, **extra) -> dict:
    return {"temperature": temperature, "top_p": 1.0, "top_k": -1, "logprobs": True, "seed": seed,
            "max_tokens": MAX_TOKENS, "aflow_grammar": GRAMMAR, **extra}


@pytest.fixture(scope="module")
def samples(server, prompt_ids):
    """(temperature, TokenOutput) for 16 requests at 1.0 and 6 at 2.0, decoded together as one batch."""
    temperatures = [1.0] * 16 + [2.0] * 6

    async def go():
        return await asyncio.gather(*[
            server.generate(f"r{i}", prompt_ids=prompt_ids, sampling_params=_params(t, 1000 + i))
            for i, t in enumerate(temperatures)])

    return list(zip(temperatures, asyncio.run(go()), strict=True))


def _logits(model, prompt_ids, token_ids) -> torch.Tensor:
    """The model's logits scoring each response token: [len(token_ids), V]."""
    ids = torch.tensor([list(prompt_ids) + list(token_ids)])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()
    return logits[len(prompt_ids) - 1: len(prompt_ids) - 1 + len(token_ids)]


@pytest.fixture(scope="module")
def prompt_cache(policy, prompt_ids):
    """The prompt's KV cache and last logits, so recomputing many responses costs their own tokens only."""
    model, _ = policy
    with torch.no_grad():
        out = model(input_ids=torch.tensor([prompt_ids]), use_cache=True)
    return out.past_key_values, out.logits[0, -1].float()


def _cached_logits(model, prompt_cache, token_ids) -> torch.Tensor:
    past, last = prompt_cache
    if len(token_ids) == 1:
        return last[None]
    with torch.no_grad():
        out = model(input_ids=torch.tensor([token_ids[:-1]]), past_key_values=copy.deepcopy(past), use_cache=True)
    return torch.cat([last[None], out.logits[0].float()])


def _recompute(model, constraint, prompt_ids, output, temperature, prompt_cache=None):
    """(constrained, plain) log-probs of the output's tokens, recomputed by a forward pass (a fresh one, or
    one over the response on top of the prompt's cache)."""
    logits = (_logits(model, prompt_ids, output.token_ids) if prompt_cache is None
              else _cached_logits(model, prompt_cache, output.token_ids)) / temperature
    labels = torch.tensor(output.token_ids)
    states = torch.tensor(constraint.states(output.token_ids))
    plain = torch.log_softmax(logits, -1).gather(-1, labels[:, None]).squeeze(-1)
    return constrained_log_probs(logits, labels, states, constraint), plain


# ----------------------------------------------------------------------------- the token constraint


def test_building_is_fast_cached_and_every_state_continues(policy, constraint):
    _, tokenizer = policy
    started, cpu = time.monotonic(), time.process_time()
    fresh = TokenConstraint(tokenizer, constraint.grammar)
    built, cpu = time.monotonic() - started, time.process_time() - cpu
    print(f"TokenConstraint for {len(tokenizer)} tokens built in {built:.2f} s ({cpu:.2f} s of CPU)")
    # ~1-2 s of CPU (`python -m bench.token_constraint` times it); CPU time, which a busy machine
    # does not inflate as it does the wall clock
    assert cpu < 15
    assert token_constraint(tokenizer, GRAMMAR) is constraint
    assert token_constraint(tokenizer, GRAMMAR, len(tokenizer)) is constraint
    assert all(bool(constraint.allowed(s).any()) for s in constraint.grammar.states)
    assert all(torch.equal(fresh.allowed(s), constraint.allowed(s)) for s in constraint.grammar.states)


def test_masks_equal_a_walk_of_every_token(constraint):
    """The grouping and text_room shortcuts give what walking each token from the state gives."""
    g = constraint.grammar
    eos = sorted(constraint.eos_ids)
    checked = [g.start(), g.walk("ADD"), g.walk("ADD REVIEW"), g.walk("ENSEMBLE 2 "), g.walk("SET_PROMPT 3 "),
               g.walk('SET_PROMPT 3 "'), g.walk('SET_PROMPT 3 "' + "x" * 150), g.walk('SET_PROMPT 3 "' + "x" * 199),
               g.walk('SET_PROMPT 3 "' + "x" * 200), g.walk('SET_PROMPT 3 "a"'), g.walk("FINISH"), g.walk("FINISH\n")]
    for state in checked:
        walked = torch.tensor([s is not None and g.walk(s, state) is not None for s in constraint._strings])
        walked[eos] = g.accepting(state)
        assert torch.equal(walked, constraint.allowed(state)), state
    assert constraint.allowed(g.walk("FINISH\n")).nonzero().flatten().tolist() == eos  # only EOS after "\n"
    assert not constraint.allowed(TokenConstraint.END).any()


def test_special_tokens_never_match(policy, constraint):
    _, tokenizer = policy
    for token_id in set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder):
        if token_id not in constraint.eos_ids:
            assert not any(constraint.allowed(s)[token_id] for s in constraint.grammar.states), token_id


@pytest.mark.parametrize("line", ["ADD REVIEW AFTER 2", 'SET_PROMPT 2 "be brief, then answer."\n', "FINISH\n",
                                  "ENSEMBLE 1 3", 'SET_PROMPT 1 ""'])
def test_states_and_advance_follow_the_character_walk(policy, constraint, line):
    _, tokenizer = policy
    g = constraint.grammar
    tokens = tokenizer(line, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    states = constraint.states(tokens)
    for k, token in enumerate(tokens):
        assert states[k] == g.walk(constraint.text(tokens[:k]))
        assert bool(constraint.allowed(states[k])[token])
        following = constraint.advance(states[k], token)
        assert following == (TokenConstraint.END if k == len(tokens) - 1 else states[k + 1])
    assert constraint.text(tokens) == line and isinstance(parse(line), Action)
    assert constraint.advance(g.walk("ADD"), tokenizer.eos_token_id) is None  # EOS only where complete
    with pytest.raises(ValueError):
        constraint.states(tokenizer("ADD SOMETHING", add_special_tokens=False).input_ids)


def test_log_allowed_mass_is_zero_where_unconstrained(constraint):
    logits = torch.randn(4, constraint.vocab_size)
    mass = log_allowed_mass(logits, torch.tensor([-1, constraint.start, -1, constraint.grammar.walk("DELETE ")]),
                            constraint)
    assert mass[0] == 0 and mass[2] == 0 and mass[1] < 0 and mass[3] < 0
    expected = torch.logsumexp(logits[1][constraint.allowed(constraint.start)], 0) - torch.logsumexp(logits[1], 0)
    assert torch.isclose(mass[1], expected, atol=1e-5)


# ----------------------------------------------------------------------------- sampling under the constraint


def test_constrained_sampling_never_emits_an_unparseable_action(samples, constraint):
    complete = 0
    for temperature, output in samples:
        text = constraint.text(output.token_ids)
        if output.token_ids[-1] in constraint.eos_ids:
            assert isinstance(parse(text), Action), (temperature, text)
            complete += 1
        else:  # cut by max_tokens: a prefix of an action, never a wrong turn
            assert len(output.token_ids) == MAX_TOKENS and constraint.grammar.walk(text) is not None, text
    assert complete >= len(samples) // 2
    assert len({tuple(o.token_ids) for _, o in samples}) > 5  # really sampled, not one forced line


def test_rollout_log_probs_equal_a_recomputation_alone(server, policy, constraint, prompt_ids):
    """(b) and (f): one request alone; the recomputation with the correction matches to 1e-4, without it not."""
    model, _ = policy
    output = asyncio.run(server.generate("alone", prompt_ids=prompt_ids, sampling_params=_params(1.0, 7)))
    text = constraint.text(output.token_ids)
    if output.token_ids[-1] in constraint.eos_ids:  # ended: a whole action
        assert isinstance(parse(text), Action), text
    else:  # cut by max_tokens: a prefix of an action
        assert len(output.token_ids) == MAX_TOKENS and constraint.grammar.walk(text) is not None, text
    constrained, plain = _recompute(model, constraint, prompt_ids, output, 1.0)
    rollout = torch.tensor(output.log_probs)
    assert torch.allclose(constrained, rollout, atol=TOLERANCE), (constrained - rollout).abs().max()
    # a trainer that ignored the constraint would be caught: its log-probs are off by the allowed mass
    assert (plain - rollout).abs().max() > 100 * TOLERANCE


def test_rollout_log_probs_equal_a_recomputation_in_a_batch(samples, policy, constraint, prompt_ids, prompt_cache):
    model, _ = policy
    worst = 0.0
    for temperature, output in samples:
        constrained, _ = _recompute(model, constraint, prompt_ids, output, temperature, prompt_cache)
        worst = max(worst, float((constrained - torch.tensor(output.log_probs)).abs().max()))
    assert worst < TOLERANCE


def test_allowed_token_ids_that_exclude_the_grammar_fail_the_request(server, prompt_ids, constraint):
    outside = [t for t in range(100, 200) if not constraint.allowed(constraint.start)[t]]
    with pytest.raises(ValueError, match="no token the grammar allows"):
        asyncio.run(server.generate("x", prompt_ids=prompt_ids,
                                    sampling_params=_params(1.0, 1, allowed_token_ids=outside)))


# ----------------------------------------------------------------------------- the trainer's side (verl's engine)


def _verl_batch(policy, prompt_ids, outputs, env_tokens, temperature, use_remove_padding):
    """A 2-sample batch as verl's trainer hands it to the engine: left-padded prompts, right-padded responses
    (each an action plus a few environment tokens, mask 0), converted by `left_right_2_no_padding`."""
    from verl import DataProto
    from verl.utils import tensordict_utils as tu
    from verl.workers.utils.padding import left_right_2_no_padding

    _, tokenizer = policy
    pad = tokenizer.pad_token_id
    prompts = [list(prompt_ids), list(prompt_ids)[5:]]  # different lengths
    responses = [list(o.token_ids) + env_tokens for o in outputs]
    masks = [[1] * len(o.token_ids) + [0] * len(env_tokens) for o in outputs]
    states = np.empty(2, dtype=object)
    states[:] = [constraint_states + [-1] * len(env_tokens) for constraint_states in
                 (token_constraint(tokenizer, GRAMMAR).states(o.token_ids) for o in outputs)]
    width_p, width_r = max(map(len, prompts)) + 3, max(map(len, responses)) + 4
    ids, attention, response_mask = [], [], []
    for prompt, response, mask in zip(prompts, responses, masks, strict=True):
        ids.append([pad] * (width_p - len(prompt)) + prompt + response + [pad] * (width_r - len(response)))
        attention.append([0] * (width_p - len(prompt)) + [1] * (len(prompt) + len(response))
                         + [0] * (width_r - len(response)))
        response_mask.append(mask + [0] * (width_r - len(mask)))
    ids, attention = torch.tensor(ids), torch.tensor(attention)
    batch = DataProto.from_dict(
        tensors={"input_ids": ids, "attention_mask": attention, "position_ids": (attention.cumsum(-1) - 1).clamp(0),
                 "prompts": ids[:, :width_p], "responses": ids[:, width_p:],
                 "response_mask": torch.tensor(response_mask)},
        non_tensors={"constraint_states": states, "constraint_grammar": np.array([GRAMMAR, GRAMMAR], dtype=object)})
    td = left_right_2_no_padding(batch.to_tensordict())
    tu.assign_non_tensor(td, temperature=temperature, use_remove_padding=use_remove_padding, calculate_entropy=False)
    return td, torch.tensor(response_mask)


def _engine(policy, pad_to_length=False):
    from agent_system.verl_cpu.constrained_engine import ConstrainedFSDPEngineWithLMHead

    _, tokenizer = policy
    engine = object.__new__(ConstrainedFSDPEngineWithLMHead)  # the hooks need no FSDP set-up
    engine.model_config = SimpleNamespace(tokenizer=tokenizer)
    engine.use_ulysses_sp = False
    engine.pad_to_length, engine.pad_to_length_bucket = pad_to_length, 64
    return engine


@pytest.mark.parametrize("use_remove_padding", [False, True])
def test_engine_recomputes_the_rollout_log_probs(samples, policy, prompt_ids, use_remove_padding):
    """(d): verl's own input preparation, a real forward, our prepare_model_outputs, verl's response slice:
    the rollout's log-probs on the action tokens; on environment tokens verl's plain log-probs."""
    from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead
    from verl.workers.utils.padding import no_padding_2_padding

    model, tokenizer = policy
    temperature = 1.0
    outputs = [o for t, o in samples if t == temperature][:2]
    env_tokens = tokenizer("\nobservation: ok", add_special_tokens=False).input_ids
    td, response_mask = _verl_batch(policy, prompt_ids, outputs, env_tokens, temperature, use_remove_padding)
    engine = _engine(policy, pad_to_length=use_remove_padding)
    inputs, output_args = engine.prepare_model_inputs(td)
    if use_remove_padding:
        # the packed forward needs varlen attention; the same logits come from one forward per sample
        assert output_args["pad_size"] > 0  # bucketed: pad rows at the tail
        lengths = td["input_ids"].offsets().diff().tolist()
        per_sample = [model(input_ids=t[None]).logits[0] for t in td["input_ids"].unbind()]
        pad_rows = torch.randn(output_args["pad_size"], per_sample[0].shape[-1])
        logits = torch.cat([*per_sample, pad_rows])[None]
        assert logits.shape[1] == sum(lengths) + output_args["pad_size"] == inputs["input_ids"].shape[1]
    else:
        logits = model(**inputs).logits
    logits = logits.detach().requires_grad_()
    ours = engine.prepare_model_outputs(SimpleNamespace(logits=logits), output_args, td, None)["log_probs"]
    theirs = FSDPEngineWithLMHead.prepare_model_outputs(engine, SimpleNamespace(logits=logits), output_args, td,
                                                         None)["log_probs"]
    ours_padded, theirs_padded = no_padding_2_padding(ours, td), no_padding_2_padding(theirs, td)
    # sample 0 has the rollout's prompt; sample 1 a shorter one, so its reference is a direct recomputation
    constraint = token_constraint(tokenizer, GRAMMAR)
    expected = [torch.tensor(outputs[0].log_probs),
                _recompute(model, constraint, list(prompt_ids)[5:], outputs[1], temperature)[0]]
    for i, output in enumerate(outputs):
        n = len(output.token_ids)
        assert torch.allclose(ours_padded[i, :n], expected[i], atol=TOLERANCE)
        assert not torch.allclose(theirs_padded[i, :n], expected[i], atol=TOLERANCE)
        assert torch.equal(ours_padded[i, n:n + len(env_tokens)], theirs_padded[i, n:n + len(env_tokens)])
    assert response_mask.sum() == sum(len(o.token_ids) for o in outputs)

    # gradients flow through the correction: a constrained log-prob does not depend on a disallowed logit
    ours_padded[0, 0].backward()
    row = len(prompt_ids) - 1  # sample 0's first response token is scored at the last prompt position
    grad = logits.grad[0, row]  # both layouts start with sample 0's valid tokens
    allowed = constraint.allowed(constraint.start)
    assert grad[~allowed].abs().max() < 1e-6 and grad[allowed].abs().max() > 1e-3


def test_engine_leaves_unconstrained_batches_to_verl(samples, policy, prompt_ids):
    from verl.utils import tensordict_utils as tu
    from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead

    model, tokenizer = policy
    outputs = [o for _, o in samples][:2]
    td, _ = _verl_batch(policy, prompt_ids, outputs, [], 1.0, False)
    tu.assign_non_tensor_stack(td, "constraint_grammar", ["", ""])
    engine = _engine(policy)
    inputs, output_args = engine.prepare_model_inputs(td)
    with torch.no_grad():
        output = SimpleNamespace(logits=model(**inputs).logits)
    ours = engine.prepare_model_outputs(output, output_args, td, None)["log_probs"]
    theirs = FSDPEngineWithLMHead.prepare_model_outputs(engine, output, output_args, td, None)["log_probs"]
    assert torch.equal(ours.values(), theirs.values())


# ----------------------------------------------------------------------------- the agent loop's bookkeeping


def test_agent_loop_keeps_states_aligned_with_verls_merges(policy):
    """Constraint states follow the response through verl's Continuous Token merges exactly as its
    log-probs do: a trimmed prefix token drops its state, inserted and context tokens get -1."""
    from verl.utils.tokenizer.continuous_token import ContinuousTokenBuilder, MergeResult

    from agent_system.agent_loop.aflow_agent_loop import AFlowAgentLoop

    _, tokenizer = policy
    loop = SimpleNamespace(continuous_token_builder=ContinuousTokenBuilder(tokenizer))
    align = AFlowAgentLoop._align_states
    states = align(loop, MergeResult([1, 2, 3], 3, "assistant"), [], [], [0, 7, 9])
    assert states == [0, 7, 9]
    states = align(loop, MergeResult([1, 2, 5, 6], 2, "context", removed_prefix_token_count=1,
                                     inserted_token_ids=[4]), [1, 1, 1], states)
    assert states == [0, 7, -1, -1, -1]
    states = align(loop, MergeResult([0] * 7, 2, "assistant"), [1, 1, 0, 0, 0], states, [0, 3])
    assert states == [0, 7, -1, -1, -1, 0, 3]
