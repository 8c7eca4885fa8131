"""The CPU generation backend behind verl's `server_manager.generate`, with the real SmolLM2-135M policy.

The `policy` fixture loads the default policy through its conversion cache ($AFLOW_POLICY_CACHE or
~/.cache/aflow/smollm2-135m-instruct-hf; the first run on a machine converts the GGUF once). The fresh-conversion
test uses its own temporary cache and is marked slow. Generations are kept to a few tokens: on 2 shared cores a
decode step of the float32 135M model takes 0.1-0.4 s.
"""

from __future__ import annotations

import asyncio
import math
import types

import pytest
import torch
from verl.utils import normalize_token_ids
from verl.workers.rollout.replica import TokenOutput

from agent_system.agent_loop.cpu_server import CPUServerManager
from agent_system.policy_model import (
    CACHE_ENV,
    DEFAULT_CACHE_DIR,
    SOURCE_FILE,
    drop_quantization_marker,
    load_policy,
    resolve_cache_dir,
)

SAMPLE = {"temperature": 1.0, "top_p": 1.0, "top_k": -1, "repetition_penalty": 1.0, "logprobs": True}


@pytest.fixture(scope="module")
def server(policy):
    model, tokenizer = policy
    return CPUServerManager(model=model, tokenizer=tokenizer)


@pytest.fixture(scope="module")
def prompt_ids(policy):
    _, tokenizer = policy
    messages = [{"role": "user", "content": "Name three colours."}]
    return normalize_token_ids(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True))


def generate(server, prompt_ids, request_id="r", **params) -> TokenOutput:
    return asyncio.run(server.generate(request_id, prompt_ids=prompt_ids, sampling_params=params))


@pytest.fixture(scope="module")
def seeded_reference(server, prompt_ids):
    """Seed 11 at temperature 1, generated alone (shared by the seeding and concurrency tests)."""
    return generate(server, prompt_ids, **SAMPLE, max_tokens=6, ignore_eos=True, seed=11)


def full_forward_logits(model, prompt_ids, token_ids) -> torch.Tensor:
    """Logits that predicted each generated token, from one independent pass over prompt + generated ids."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt_ids + token_ids])).logits[0].float()
    return logits[len(prompt_ids) - 1 : -1]


# (a) ---------------------------------------------------------------------------------------------


def test_generate_returns_verl_token_output(server, policy, prompt_ids):
    _, tokenizer = policy
    params = dict(SAMPLE, max_tokens=8, ignore_eos=True, seed=3)
    out = generate(server, prompt_ids, **params)
    assert isinstance(out, TokenOutput)
    assert isinstance(out.token_ids, list) and all(type(t) is int for t in out.token_ids)
    assert len(out.token_ids) == 8  # ignore_eos: exactly max_tokens
    assert isinstance(out.log_probs, list) and len(out.log_probs) == len(out.token_ids)
    assert all(isinstance(lp, float) and lp <= 0 and math.isfinite(lp) for lp in out.log_probs)
    assert tokenizer.decode(out.token_ids, skip_special_tokens=True).strip()
    assert out.stop_reason == "completed" and out.num_preempted == 0 and out.routed_experts is None
    assert {"global_steps", "min_global_steps", "max_global_steps"} <= set(out.extra_fields)
    assert params == dict(SAMPLE, max_tokens=8, ignore_eos=True, seed=3)  # the caller's dict is not mutated

    short = generate(server, prompt_ids, **dict(SAMPLE, logprobs=False), max_new_tokens=3, seed=3)
    assert 1 <= len(short.token_ids) <= 3 and short.log_probs is None  # sglang-style key; no logprobs asked


def test_multimodal_input_is_refused(server, prompt_ids):
    with pytest.raises(NotImplementedError):
        asyncio.run(server.generate("r", prompt_ids=prompt_ids, sampling_params=SAMPLE, image_data=[object()]))


# (b) ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "params, mode",
    [
        ({"temperature": 1.0}, "processed_logprobs"),
        ({"temperature": 0.7, "top_k": 20}, "processed_logprobs"),
        ({"temperature": 0.0}, "processed_logprobs"),
        ({"temperature": 0.7}, "raw_logprobs"),
    ],
    ids=["t1", "t0.7-topk20", "greedy", "raw-t0.7"],
)
def test_log_probs_match_an_independent_forward_pass(policy, prompt_ids, params, mode):
    model, tokenizer = policy
    server = CPUServerManager(model=model, tokenizer=tokenizer, logprobs_mode=mode)
    out = generate(server, prompt_ids, **dict(SAMPLE, **params), max_tokens=5, ignore_eos=True, seed=5)
    logits = full_forward_logits(model, prompt_ids, out.token_ids)
    temperature = params["temperature"]
    if mode == "processed_logprobs" and temperature > 0:
        logits = logits / temperature
        if "top_k" in params:
            kth = torch.topk(logits, params["top_k"], dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, -math.inf)
    expected = torch.log_softmax(logits, dim=-1).gather(-1, torch.tensor(out.token_ids)[:, None])[:, 0]
    assert torch.allclose(torch.tensor(out.log_probs), expected, atol=1e-4, rtol=0)
    if temperature == 0:
        assert out.token_ids == logits.argmax(dim=-1).tolist()


def test_allowed_token_ids_restrict_sampling_and_renormalise(server, policy, prompt_ids):
    model, _ = policy
    allowed = [330, 389, 340, 422]  # " A", " B", " C", " D" in the SmolLM2 tokenizer
    out = generate(server, prompt_ids, **SAMPLE, max_tokens=12, seed=3, allowed_token_ids=allowed)
    assert len(out.token_ids) == 12 and set(out.token_ids) <= set(allowed)  # EOS is not allowed: no early stop
    logits = full_forward_logits(model, prompt_ids, out.token_ids)[:, allowed]
    index = torch.tensor([allowed.index(t) for t in out.token_ids])
    expected = torch.log_softmax(logits, dim=-1).gather(-1, index[:, None])[:, 0]
    assert torch.allclose(torch.tensor(out.log_probs), expected, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="allowed_token_ids"):
        generate(server, prompt_ids, **SAMPLE, max_tokens=2, allowed_token_ids=[10**9])


# (c) ---------------------------------------------------------------------------------------------


def test_same_seed_same_tokens_different_seed_different_tokens(server, prompt_ids, seeded_reference):
    again = generate(server, prompt_ids, **SAMPLE, max_tokens=6, ignore_eos=True, seed=11)
    other = generate(server, prompt_ids, **SAMPLE, max_tokens=6, ignore_eos=True, seed=12)
    assert again.token_ids == seeded_reference.token_ids
    assert again.log_probs == seeded_reference.log_probs
    assert other.token_ids != seeded_reference.token_ids


def test_base_seed_makes_unseeded_requests_reproducible(policy, prompt_ids):
    model, tokenizer = policy
    first = CPUServerManager(model=model, tokenizer=tokenizer, base_seed=7)
    second = CPUServerManager(model=model, tokenizer=tokenizer, base_seed=7)
    params = dict(SAMPLE, max_tokens=3, ignore_eos=True)
    assert generate(first, prompt_ids, **params).token_ids == generate(second, prompt_ids, **params).token_ids


# (d) ---------------------------------------------------------------------------------------------


def test_greedy_is_deterministic_and_stops_at_eos(server, policy):
    _, tokenizer = policy
    messages = [{"role": "user", "content": "What is 2+2?"}]
    ids = normalize_token_ids(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True))
    a = generate(server, ids, temperature=0, max_tokens=24, seed=1)
    b = generate(server, ids, temperature=0, max_tokens=24, seed=2)
    assert a.token_ids == b.token_ids
    assert a.log_probs is None  # logprobs not requested
    # SmolLM2 answers this one in a dozen tokens: the turn ends with <|im_end|>, kept like vLLM keeps EOS.
    assert len(a.token_ids) < 24 and a.token_ids[-1] == tokenizer.eos_token_id == 2


# (e) ---------------------------------------------------------------------------------------------


def test_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv(CACHE_ENV, raising=False)
    assert resolve_cache_dir() == DEFAULT_CACHE_DIR.expanduser().resolve()
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "env"))
    assert resolve_cache_dir() == (tmp_path / "env").resolve()
    assert resolve_cache_dir(tmp_path / "arg") == (tmp_path / "arg").resolve()


def test_quantization_marker_is_dropped():
    model = types.SimpleNamespace(
        config=types.SimpleNamespace(quantization_config={"quant_method": "gguf"}),
        hf_quantizer=object(),
        is_quantized=True,
    )
    drop_quantization_marker(model)
    assert getattr(model.config, "quantization_config", None) is None
    assert model.hf_quantizer is None and model.is_quantized is False


def test_cached_policy_is_reused_and_saves(policy, tmp_path):
    model, tokenizer = policy
    cache = resolve_cache_dir()
    weights = next(cache.glob("*.safetensors"))
    before = (weights.stat().st_mtime_ns, (cache / "config.json").stat().st_mtime_ns)
    again, again_tokenizer = load_policy(None)
    assert (weights.stat().st_mtime_ns, (cache / "config.json").stat().st_mtime_ns) == before
    assert torch.equal(again.lm_head.weight, model.lm_head.weight)
    assert again_tokenizer.chat_template and again_tokenizer.pad_token is not None
    assert again_tokenizer.eos_token == "<|im_end|>"

    saved = tmp_path / "saved"
    again.save_pretrained(saved)
    again_tokenizer.save_pretrained(saved)
    assert (saved / "model.safetensors").is_file()
    assert getattr(again.config, "quantization_config", None) is None
    reloaded, reloaded_tokenizer = load_policy(saved)  # any local HF directory
    assert torch.equal(reloaded.lm_head.weight, model.lm_head.weight)
    assert reloaded_tokenizer.chat_template == tokenizer.chat_template


@pytest.mark.model  # converts and loads the policy itself
def test_first_load_converts_atomically_then_reuses(monkeypatch, tmp_path):
    target = tmp_path / "policy-cache"
    monkeypatch.setenv(CACHE_ENV, str(target))
    model, tokenizer = load_policy(None)  # converts the GGUF: its save_pretrained must not trip over a marker
    assert sorted(p.name for p in tmp_path.iterdir()) == ["policy-cache"]  # no staging directory left behind
    assert (target / "model.safetensors").is_file() and (target / SOURCE_FILE).is_file()
    assert (target / "config.json").is_file() and (target / "tokenizer.json").is_file()
    assert tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|im_end|>"
    mtimes = {p.name: p.stat().st_mtime_ns for p in target.iterdir()}
    again, _ = load_policy(None)
    assert {p.name: p.stat().st_mtime_ns for p in target.iterdir()} == mtimes
    assert torch.equal(again.model.embed_tokens.weight, model.model.embed_tokens.weight)
    model.save_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved" / "model.safetensors").is_file()


# (f) ---------------------------------------------------------------------------------------------


async def generate_concurrently(server, requests):
    """[(prompt_ids, params)] sent at once inside one running loop; returns (outputs, event-loop ticks)."""
    done = asyncio.Event()
    ticks = 0

    async def ticker():
        nonlocal ticks
        while not done.is_set():
            await asyncio.sleep(0.01)
            ticks += 1

    ticking = asyncio.create_task(ticker())
    outputs = await asyncio.gather(*(server.generate(f"req-{i}", prompt_ids=ids, sampling_params=params)
                                     for i, (ids, params) in enumerate(requests)))
    done.set()
    await ticking
    return outputs, ticks


def expected_log_probs(model, prompt_ids, token_ids, temperature=1.0):
    logits = full_forward_logits(model, prompt_ids, token_ids)
    if temperature > 0:
        logits = logits / temperature
    return torch.log_softmax(logits, dim=-1).gather(-1, torch.tensor(token_ids)[:, None])[:, 0]


def test_full_determinism_serves_requests_alone_so_seeds_hold_under_concurrency(policy, prompt_ids,
                                                                                seeded_reference):
    model, tokenizer = policy
    server = CPUServerManager(model=model, tokenizer=tokenizer, full_determinism=True)
    assert server.max_batch_size == 1
    requests = [(prompt_ids, dict(SAMPLE, max_tokens=6, ignore_eos=True, seed=seed)) for seed in (11, 12, 13)]
    outputs, ticks = asyncio.run(generate_concurrently(server, requests))
    assert all(len(o.token_ids) == 6 and len(o.log_probs) == 6 for o in outputs)
    assert outputs[0].token_ids == seeded_reference.token_ids  # seeding holds under concurrency
    assert outputs[0].log_probs == seeded_reference.log_probs
    assert server.largest_batch == 1
    assert ticks >= 5  # the event loop kept running while the model generated


def test_concurrent_requests_are_decoded_as_one_batch(policy, prompt_ids):
    """Prompts of different lengths, different budgets, stop rules and temperatures in one batch: each row
    stops on its own, and its log-probs are those of an independent forward pass over its own sequence."""
    model, tokenizer = policy
    server = CPUServerManager(model=model, tokenizer=tokenizer, max_batch_size=8)
    short = normalize_token_ids(tokenizer.apply_chat_template([{"role": "user", "content": "What is 2+2?"}],
                                                              add_generation_prompt=True, tokenize=True))
    assert len(short) != len(prompt_ids)
    requests = [
        (prompt_ids, dict(SAMPLE, max_tokens=6, ignore_eos=True, seed=11)),
        (short, dict(SAMPLE, max_tokens=2, ignore_eos=True, seed=12)),
        (short, {"temperature": 0, "max_tokens": 24, "logprobs": True}),  # stops at EOS
        (prompt_ids, dict(SAMPLE, temperature=0.7, max_tokens=9, ignore_eos=True, seed=13)),
    ]
    outputs, ticks = asyncio.run(generate_concurrently(server, requests))
    assert server.largest_batch == 4  # all four were pending together and decoded as one batch
    assert [len(o.token_ids) for o in outputs][:2] == [6, 2] and len(outputs[3].token_ids) == 9
    greedy = outputs[2].token_ids
    assert greedy[-1] == tokenizer.eos_token_id and len(greedy) < 24
    assert greedy == full_forward_logits(model, short, greedy).argmax(dim=-1).tolist()
    for (ids, params), out in zip(requests, outputs, strict=True):
        expected = expected_log_probs(model, ids, out.token_ids, params["temperature"])
        if params["temperature"] == 0:  # greedy: log_softmax of the raw logits, as vLLM returns
            expected = torch.log_softmax(full_forward_logits(model, ids, out.token_ids), dim=-1).gather(
                -1, torch.tensor(out.token_ids)[:, None])[:, 0]
        assert torch.allclose(torch.tensor(out.log_probs), expected, atol=1e-3, rtol=0)
    assert ticks >= 1


def test_a_failing_request_fails_its_batch_not_the_server(policy, prompt_ids, monkeypatch):
    model, tokenizer = policy
    server = CPUServerManager(model=model, tokenizer=tokenizer)
    real = server._decode
    monkeypatch.setattr(server, "_decode", lambda *a: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        generate(server, prompt_ids, **SAMPLE, max_tokens=2)
    monkeypatch.setattr(server, "_decode", real)
    assert len(generate(server, prompt_ids, **SAMPLE, max_tokens=2).token_ids) == 2


# verl's own agent loop and weight updates ----------------------------------------------------------


def test_verl_single_turn_agent_loop_runs_on_the_cpu_server(policy):
    from omegaconf import OmegaConf
    from verl.experimental.agent_loop.agent_loop import DictConfigWrap
    from verl.experimental.agent_loop.single_turn_agent_loop import SingleTurnAgentLoop
    from verl.utils.dataset.rl_dataset import RLHFDataset

    model, tokenizer = policy
    config = OmegaConf.create(
        {"actor_rollout_ref": {"rollout": {"prompt_length": 128, "response_length": 6}}, "data": {}}
    )
    server = CPUServerManager(config=config, model=model, tokenizer=tokenizer, base_seed=0)
    server.set_global_steps(3)

    async def main():
        loop = SingleTurnAgentLoop(
            trainer_config=DictConfigWrap(config),
            server_manager=server,
            tokenizer=tokenizer,
            processor=None,
            dataset_cls=RLHFDataset,
            data_config=DictConfigWrap(config.data),
            hf_model_type="llama",
        )
        return await loop.run(dict(SAMPLE), raw_prompt=[{"role": "user", "content": "Say hi."}])

    out = asyncio.run(main())
    assert 1 <= len(out.response_ids) <= 6  # no max_tokens: the rollout response_length is the budget
    assert len(out.response_logprobs) == len(out.response_ids) == sum(out.response_mask)
    assert out.extra_fields["max_global_steps"] == 3


def test_update_weights(server, policy):
    model, _ = policy
    name = "model.norm.weight"
    original = model.state_dict()[name].clone()
    version = server.update_weights(model)  # the trainer shares the model object: nothing to copy
    assert server.update_weights(model) == version + 1
    try:
        server.update_weights({name: original + 1}, strict=False)
        assert torch.equal(model.state_dict()[name], original + 1)
        with pytest.raises(KeyError):
            server.update_weights({name: original})  # strict: a full state dict is expected
        assert torch.equal(model.state_dict()[name], original + 1)  # refused before copying anything
        with pytest.raises(KeyError):
            server.update_weights({"no.such.weight": original}, strict=False)
    finally:
        server.update_weights([(name, original)], strict=False)
    assert torch.equal(model.state_dict()[name], original)


def test_a_request_cancelled_while_queued_is_skipped_and_the_server_goes_on(policy, prompt_ids):
    model, tokenizer = policy
    server = CPUServerManager(model=model, tokenizer=tokenizer, max_batch_size=8)
    params = dict(SAMPLE, ignore_eos=True, seed=1)

    async def main():
        long = asyncio.create_task(server.generate("long", prompt_ids=prompt_ids,
                                                   sampling_params=dict(params, max_tokens=40)))
        # until the long request's batch is decoding (not a fixed sleep, which a busy machine can
        # outlast, so that both were decoded together); the next one queues behind it
        for _ in range(6000):
            if server.largest_batch:
                break
            await asyncio.sleep(0.01)
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(server.generate("gives-up", prompt_ids=prompt_ids,
                                                   sampling_params=dict(params, max_tokens=40)), 0.05)
        first = await long
        after = await asyncio.wait_for(server.generate("after", prompt_ids=prompt_ids,
                                                       sampling_params=dict(params, max_tokens=3)), 60)
        return first, after

    first, after = asyncio.run(main())
    assert len(first.token_ids) == 40 and len(after.token_ids) == 3
    assert server.largest_batch == 1  # the cancelled request was never decoded
