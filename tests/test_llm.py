"""LLMClient against a real local HTTP server (tests/fake_openai.py): accounting, retries,
keys, reachability, the cache and the concurrency bound. Nothing in `openai` is mocked."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import pytest

from aflow.config import LLMConfig
from aflow.llm import ExecutorError, LLMCallError, LLMClient, Usage
from tests.fake_openai import FakeOpenAI

MESSAGES = [{"role": "user", "content": "What is six times seven?"}]
KEY_VARIABLES = ("OPENAI_API_KEY", "ANTHROPIC_API_KEY", "AFLOW_TEST_KEY")


@pytest.fixture(autouse=True)
def no_keys(monkeypatch):
    for name in KEY_VARIABLES:
        monkeypatch.delenv(name, raising=False)


def config_for(server: FakeOpenAI, **overrides) -> LLMConfig:
    """Fast retries and no cache unless a test asks for them (never the user's cache)."""
    values = dict(base_url=server.base_url, model="fake-model", backoff_base=0.01, backoff_max=0.05,
                  timeout=5.0, cache=False)
    values.update(overrides)
    return LLMConfig(**values)


def run_chats(config: LLMConfig, n: int = 1, messages=MESSAGES, concurrent: bool = False):
    """Make `n` chat calls with one client; returns (completions or exceptions, client usage, per-call usage)."""

    async def go():
        client = LLMClient(config)
        usage = Usage()
        try:
            if concurrent:
                results = await asyncio.gather(*(client.chat(messages, usage=usage) for _ in range(n)),
                                               return_exceptions=True)
            else:
                results = []
                for _ in range(n):
                    try:
                        results.append(await client.chat(messages, usage=usage))
                    except LLMCallError as exc:
                        results.append(exc)
        finally:
            await client.close()
        return results, client.usage, usage

    return asyncio.run(go())


def one_line(text: str) -> bool:
    return bool(text.strip()) and "\n" not in text.strip()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- accounting ------------------------------------------------------------------------

def test_success_counts_tokens_and_cost(fake_openai):
    fake_openai.usage = (1200, 300)
    config = config_for(fake_openai, prices={"fake-model": (2.0, 8.0)})
    [completion], total, usage = run_chats(config)
    assert completion.text == "The answer is 42"
    assert (completion.prompt_tokens, completion.completion_tokens) == (1200, 300)
    expected = (1200 * 2.0 + 300 * 8.0) / 1e6
    assert completion.cost_usd == pytest.approx(expected)
    for u in (total, usage):
        assert (u.calls, u.retries, u.failures, u.cached) == (1, 0, 0, 0)
        assert (u.prompt_tokens, u.completion_tokens) == (1200, 300)
        assert u.cost_usd == pytest.approx(expected)
    [request] = fake_openai.chat_requests
    assert request.body["model"] == "fake-model"
    assert request.body["messages"] == MESSAGES
    assert request.body["temperature"] == 0.0


def test_unknown_model_counts_tokens_at_zero_cost(fake_openai):
    fake_openai.usage = (50, 7)
    config = config_for(fake_openai, model="mystery-model", prices={"fake-model": (2.0, 8.0)})
    [completion], total, _ = run_chats(config)
    assert (total.prompt_tokens, total.completion_tokens) == (50, 7)
    assert total.cost_usd == 0.0 and completion.cost_usd == 0.0
    assert fake_openai.chat_requests[0].body["model"] == "mystery-model"


def test_usage_accumulates_over_calls(fake_openai):
    fake_openai.reply = lambda messages: "one two three"
    _, total, usage = run_chats(config_for(fake_openai), n=3)
    # the fake counts words: 5 in the prompt, 3 in the reply
    assert (total.calls, total.prompt_tokens, total.completion_tokens) == (3, 15, 9)
    assert usage == total


# ---- retries ---------------------------------------------------------------------------

@pytest.mark.parametrize("faults", [["429"], ["500", "500"], ["bad_json"], ["429", "bad_json", "500"]])
def test_transient_failures_are_retried(fake_openai, faults):
    fake_openai.add_faults(faults)
    [completion], total, usage = run_chats(config_for(fake_openai))
    assert completion.text == "The answer is 42"
    assert fake_openai.count == len(faults) + 1
    assert [r.fault for r in fake_openai.chat_requests] == [*faults, None]
    for u in (total, usage):
        assert (u.calls, u.retries, u.failures) == (len(faults) + 1, len(faults), 0)
    assert fake_openai.pending_faults == []


def test_stall_past_timeout_is_retried(fake_openai):
    fake_openai.stall_seconds = 30.0  # ended at once when the fake stops
    fake_openai.add_faults(["stall"])
    started = time.monotonic()
    [completion], total, _ = run_chats(config_for(fake_openai, timeout=0.5))
    elapsed = time.monotonic() - started
    assert completion.text == "The answer is 42"
    assert (total.calls, total.retries, total.failures) == (2, 1, 0)
    assert fake_openai.count == 2
    # the client gave up on the stall after its 0.5 s timeout, not when the server dropped it (30 s)
    assert 0.45 <= elapsed < 15.0


def test_persistent_500_raises_one_line_and_counts_a_failure(fake_openai):
    fake_openai.default_fault = "500"
    config = config_for(fake_openai, max_retries=3)
    [error], total, usage = run_chats(config)
    assert isinstance(error, LLMCallError)
    message = str(error)
    assert one_line(message)
    assert "HTTP 500" in message and "fake-model" in message
    assert fake_openai.count == 4
    for u in (total, usage):
        assert (u.calls, u.retries, u.failures) == (4, 3, 1)
        assert (u.prompt_tokens, u.completion_tokens, u.cost_usd) == (0, 0, 0.0)


def test_client_error_is_not_retried(fake_openai):
    # a 400 (here: a body without messages) is the caller's fault; retrying cannot help
    [error], total, _ = run_chats(config_for(fake_openai), messages="not a list")
    assert isinstance(error, LLMCallError) and "HTTP 400" in str(error)
    assert fake_openai.count == 1
    assert (total.calls, total.retries, total.failures) == (1, 0, 1)


# ---- keys ------------------------------------------------------------------------------

def test_missing_openai_key_is_one_line_naming_the_variable():
    config = LLMConfig(base_url="https://api.openai.com/v1", model="gpt-4o-mini")
    with pytest.raises(ExecutorError) as info:
        LLMClient(config)
    assert one_line(str(info.value))
    assert "OPENAI_API_KEY" in str(info.value)


def test_anthropic_key_is_never_read_from_openai_key(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-openai-not-for-anthropic")
    config = LLMConfig(base_url="https://api.anthropic.com/v1/", model="claude-sonnet-4-5")
    assert config.key_env() == "ANTHROPIC_API_KEY"
    with pytest.raises(ExecutorError) as info:
        LLMClient(config)
    assert one_line(str(info.value))
    assert "ANTHROPIC_API_KEY" in str(info.value)


def test_local_server_needs_no_key_and_gets_none(monkeypatch, fake_openai):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-must-not-leak-to-local")
    config = config_for(fake_openai)
    assert config.key_env() is None
    [completion], _, _ = run_chats(config)
    assert completion.text == "The answer is 42"
    [request] = fake_openai.chat_requests
    assert "sk-must-not-leak-to-local" not in request.headers.get("authorization", "")


def test_api_key_env_override_is_sent_as_bearer(monkeypatch, fake_openai):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-wrong-variable")
    monkeypatch.setenv("AFLOW_TEST_KEY", "sk-test-override-123")
    config = config_for(fake_openai, api_key_env="AFLOW_TEST_KEY")
    assert config.key_env() == "AFLOW_TEST_KEY"
    run_chats(config)
    [request] = fake_openai.chat_requests
    assert request.headers["authorization"] == "Bearer sk-test-override-123"


def test_api_key_env_override_missing_is_one_line(fake_openai):
    with pytest.raises(ExecutorError) as info:
        LLMClient(config_for(fake_openai, api_key_env="AFLOW_TEST_KEY"))
    assert one_line(str(info.value)) and "AFLOW_TEST_KEY" in str(info.value)


# ---- reachability ----------------------------------------------------------------------

def test_check_passes_against_a_live_server(fake_openai):
    async def go():
        client = LLMClient(config_for(fake_openai))
        try:
            await client.check()
        finally:
            await client.close()

    asyncio.run(go())
    assert [r.path for r in fake_openai.requests] == ["/v1/models"]


def test_check_on_unreachable_server_is_one_line():
    config = LLMConfig(base_url=f"http://127.0.0.1:{closed_port()}/v1", model="fake-model", cache=False, timeout=30)

    async def go():
        client = LLMClient(config)
        try:
            await client.check()
        finally:
            await client.close()

    started = time.monotonic()
    with pytest.raises(ExecutorError) as info:
        asyncio.run(go())
    assert one_line(str(info.value))
    assert "not reachable" in str(info.value) and config.base_url in str(info.value)
    assert time.monotonic() - started < 15  # refused at once, not after the 30 s timeout


# ---- cache -----------------------------------------------------------------------------

def test_temperature_zero_is_cached(fake_openai, tmp_path):
    config = config_for(fake_openai, cache=None, temperature=0.0, cache_path=tmp_path / "cache.sqlite")
    assert config.cache_enabled
    [first, second], total, usage = run_chats(config, n=2)
    assert fake_openai.count == 1
    assert (first.cached, second.cached) == (False, True)
    assert second.text == first.text and second.prompt_tokens == first.prompt_tokens
    assert second.cost_usd == 0.0
    for u in (total, usage):
        assert (u.calls, u.cached) == (1, 1)
    # the cache outlives the client: a new one answers from it without a request
    [third], total, _ = run_chats(config)
    assert third.cached and fake_openai.count == 1 and (total.calls, total.cached) == (0, 1)


def test_failures_are_not_cached(fake_openai, tmp_path):
    config = config_for(fake_openai, cache=None, max_retries=0, cache_path=tmp_path / "cache.sqlite")
    fake_openai.add_faults(["500"])
    [error, completion], total, _ = run_chats(config, n=2)
    assert isinstance(error, LLMCallError)
    assert completion.text == "The answer is 42" and not completion.cached
    assert fake_openai.count == 2 and total.cached == 0


def test_temperature_above_zero_is_not_cached_by_default(fake_openai, tmp_path):
    path = tmp_path / "cache.sqlite"
    config = config_for(fake_openai, cache=None, temperature=0.7, cache_path=path)
    assert not config.cache_enabled
    [first, second], total, _ = run_chats(config, n=2)
    assert fake_openai.count == 2
    assert not first.cached and not second.cached
    assert (total.calls, total.cached) == (2, 0)
    assert not path.exists()
    assert fake_openai.chat_requests[0].body["temperature"] == 0.7


# ---- concurrency -----------------------------------------------------------------------

def test_max_concurrency_bounds_requests_in_flight(fake_openai):
    fake_openai.latency = 0.3
    config = config_for(fake_openai, max_concurrency=2)
    started = time.monotonic()
    results, total, _ = run_chats(config, n=6, concurrent=True)
    elapsed = time.monotonic() - started
    assert all(r.text == "The answer is 42" for r in results)
    assert fake_openai.count == 6 and total.calls == 6
    assert fake_openai.max_in_flight == 2
    assert elapsed >= 0.85  # three waves of two


def test_unbounded_calls_do_overlap(fake_openai):
    # the counterpart of the bound above: the fake server really serves calls in parallel
    fake_openai.latency = 0.5
    results, _, _ = run_chats(config_for(fake_openai, max_concurrency=6), n=6, concurrent=True)
    assert all(r.text == "The answer is 42" for r in results)
    assert fake_openai.max_in_flight >= 3  # more than the bound of 2 above ever lets through


# ---- the fake server itself --------------------------------------------------------------

def test_fake_server_stops_promptly_during_a_stall():
    fake = FakeOpenAI(faults=["stall"], stall_seconds=30.0).start()
    config = config_for(fake, timeout=0.3, max_retries=0)
    [error], _, _ = run_chats(config)
    assert isinstance(error, LLMCallError) and "timed out" in str(error)
    started = time.monotonic()
    fake.stop()
    assert time.monotonic() - started < 15.0  # the stall ended at once, not after its 30 s
    assert not fake.running
    assert not [t for t in threading.enumerate() if t.name.startswith("fake-openai")]
    with pytest.raises(ValueError):
        FakeOpenAI(faults=["418"])
