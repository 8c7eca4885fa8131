"""Async client for any OpenAI-compatible chat endpoint, with retries, accounting and a cache.

One `LLMClient` is shared by a whole run (one connection pool, one concurrency bound,
one cache); each workflow run gets a `Usage` of its own so tokens and cost can be
attributed per problem as well as per run.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import sqlite3
import time
from contextlib import closing
from dataclasses import dataclass

import openai

from aflow.config import LLMConfig
from aflow.files import open_sqlite


class ExecutorError(RuntimeError):
    """A set-up problem with an endpoint (no key, unreachable); the message is one line."""


@dataclass
class Usage:
    calls: int = 0  # requests actually sent (cache hits excluded)
    cached: int = 0
    cached_tokens: int = 0  # prompt + completion tokens of the cache hits (what they stand for)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    retries: int = 0
    failures: int = 0
    outages: int = 0  # failures whose last error was transient (down, overloaded, timing out): the executor's

    def add(self, other: Usage) -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))


@dataclass
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float
    cached: bool


class ResponseCache:
    """sqlite: key -> completion. Each access opens its own short connection, so the
    cache is safe to share between processes and threads."""

    def __init__(self, path):
        self.path = str(path)
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        self._connect().close()

    def _connect(self) -> sqlite3.Connection:
        return open_sqlite(self.path, "CREATE TABLE IF NOT EXISTS responses (key TEXT PRIMARY KEY, value TEXT)")

    @staticmethod
    def key(model: str, messages: list[dict], params: dict) -> str:
        blob = json.dumps({"model": model, "messages": messages, "params": params}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()

    def get(self, key: str) -> dict | None:
        with closing(self._connect()) as db, db:
            row = db.execute("SELECT value FROM responses WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else None

    def put(self, key: str, value: dict) -> None:
        with closing(self._connect()) as db, db:
            db.execute("INSERT OR REPLACE INTO responses VALUES (?, ?)", (key, json.dumps(value)))


def _retryable(exc: BaseException) -> bool:
    if isinstance(exc, (openai.APITimeoutError, openai.APIConnectionError, asyncio.TimeoutError)):
        return True
    if isinstance(exc, openai.APIStatusError):
        return exc.status_code == 429 or exc.status_code >= 500
    # A 200 whose body is not the JSON it should be: usually a proxy or a server under load.
    return isinstance(exc, (ValueError, openai.APIResponseValidationError))


def _retry_after(exc: BaseException | None) -> float | None:
    """Seconds from a Retry-After header (the delta form), if the failed response had one."""
    response = getattr(exc, "response", None) if isinstance(exc, openai.APIStatusError) else None
    try:
        return max(0.0, float(response.headers.get("retry-after", ""))) if response is not None else None
    except ValueError:
        return None


def describe(exc: BaseException) -> str:
    if isinstance(exc, openai.APIStatusError):
        return f"HTTP {exc.status_code}: {str(exc.message)[:200]}"
    if isinstance(exc, openai.APITimeoutError):
        return "timed out"
    if isinstance(exc, openai.APIConnectionError):
        return "connection failed"
    return f"{type(exc).__name__}: {str(exc)[:200]}"


class LLMClient:
    def __init__(self, config: LLMConfig):
        if not config.base_url or not config.model:
            raise ExecutorError("no executor configured: give --executor-base-url and --executor-model")
        self.config = config
        env = config.key_env()
        key = os.environ.get(env) if env else None
        if env and not key:
            raise ExecutorError(f"{config.base_url} needs an API key: set {env} (or choose another variable with api_key_env)")
        self._client = openai.AsyncOpenAI(
            base_url=config.base_url, api_key=key or "EMPTY", timeout=config.timeout, max_retries=0
        )
        self._semaphore = asyncio.Semaphore(config.max_concurrency)
        try:
            self._cache = ResponseCache(config.cache_path) if config.cache_enabled else None
        except (OSError, sqlite3.Error) as exc:
            raise ExecutorError(f"cannot use the response cache {config.cache_path}: {exc} "
                                "(choose another --cache-path, or --no-cache)") from exc
        self.usage = Usage()

    async def close(self) -> None:
        await self._client.close()

    async def chat(self, messages: list[dict], usage: Usage | None = None, **overrides) -> Completion:
        """One chat completion. Retries transient failures; raises after the last try."""
        params = {"temperature": self.config.temperature, "max_tokens": self.config.max_tokens, **overrides}
        key = ResponseCache.key(self.config.model, messages, params) if self._cache else None
        if key:
            hit = await asyncio.to_thread(self._cache.get, key)
            if hit is not None:
                for u in filter(None, (self.usage, usage)):
                    u.cached += 1
                    u.cached_tokens += hit["prompt_tokens"] + hit["completion_tokens"]
                return Completion(hit["text"], hit["prompt_tokens"], hit["completion_tokens"], 0.0, cached=True)
        completion = await self._send(messages, params, usage)
        if key:
            await asyncio.to_thread(self._cache.put, key, {
                "text": completion.text,
                "prompt_tokens": completion.prompt_tokens,
                "completion_tokens": completion.completion_tokens,
            })
        return completion

    def _delay(self, attempt: int, last: BaseException | None) -> float:
        """Seconds before retry `attempt` (1, 2, ...): exponential with jitter, or what the server asked."""
        delay = min(self.config.backoff_max, self.config.backoff_base * 2 ** (attempt - 1))
        delay *= random.uniform(0.5, 1.5)
        hinted = _retry_after(last)
        if hinted is not None:  # the server said when to come back (429/503)
            delay = min(self.config.backoff_max, max(delay, hinted))
        return delay

    async def _send(self, messages: list[dict], params: dict, usage: Usage | None) -> Completion:
        trackers = [u for u in (self.usage, usage) if u is not None]
        last: BaseException | None = None
        for attempt in range(self.config.max_retries + 1):
            if attempt:
                await asyncio.sleep(self._delay(attempt, last))
                for u in trackers:
                    u.retries += 1
            try:
                async with self._semaphore:
                    for u in trackers:
                        u.calls += 1
                    response = await self._client.chat.completions.create(
                        model=self.config.model, messages=messages, **params
                    )
                text = response.choices[0].message.content or ""
            except Exception as exc:  # classified below: transient ones are retried
                last = exc
                if not _retryable(exc):
                    break
                continue
            prompt_tokens = getattr(response.usage, "prompt_tokens", 0) or 0
            completion_tokens = getattr(response.usage, "completion_tokens", 0) or 0
            price_in, price_out = self.config.price()
            cost = (prompt_tokens * price_in + completion_tokens * price_out) / 1e6
            for u in trackers:
                u.prompt_tokens += prompt_tokens
                u.completion_tokens += completion_tokens
                u.cost_usd += cost
            return Completion(text, prompt_tokens, completion_tokens, cost, cached=False)
        assert last is not None
        for u in trackers:
            u.failures += 1
            u.outages += int(_retryable(last))
        raise LLMCallError(f"{self.config.model} at {self.config.base_url}: {describe(last)}") from last

    async def check(self, role: str = "executor", chat: bool = False) -> None:
        """Fail fast with one line when the endpoint cannot be reached at all; with `chat`, also
        when it does not answer a real chat completion (a wrong URL, not an OpenAI-compatible /v1,
        an unknown model, a server that fails every request)."""
        await self._check_reachable(role)
        if chat:
            await self._check_chat(role)

    async def _check_reachable(self, role: str) -> None:
        started = time.monotonic()
        try:
            await self._client.with_options(timeout=min(self.config.timeout, 30)).models.list()
        except openai.APIStatusError as exc:
            if exc.status_code in (401, 403):  # a wrong key would otherwise fail every problem, silently scored 0
                raise ExecutorError(
                    f"{role} {self.config.base_url} rejected the API key from "
                    f"{self.config.key_env() or 'no variable (none sent)'}: {' '.join(describe(exc).split())}"
                ) from exc
            return  # it answered; some servers just do not implement /models
        except Exception as exc:  # anything else means nothing is listening
            raise ExecutorError(
                f"{role} {self.config.base_url} is not reachable ({describe(exc)}, {time.monotonic() - started:.1f}s)"
            ) from exc


    async def _check_chat(self, role: str) -> None:
        """One real chat completion (1 token, never cached, not counted in `usage`). Transient
        failures (429, 5xx, timeouts, dropped connections, a body that is not JSON) are retried as
        every request is (max_retries, exponential backoff, Retry-After honoured): a rate-limited API
        at start-up is not a broken one. Anything else, or a reply that is not a chat completion, is a
        set-up error at once; after the last try, the error names the first and the last failure."""
        where = f"{role} {self.config.base_url} (model {self.config.model})"
        client = self._client.with_options(timeout=min(self.config.timeout, 30))
        first: BaseException | None = None
        last: BaseException | None = None
        tries = self.config.max_retries + 1
        for attempt in range(tries):
            if attempt:
                await asyncio.sleep(self._delay(attempt, last))
            try:
                response = await client.chat.completions.create(
                    model=self.config.model, messages=[{"role": "user", "content": "Reply with OK."}],
                    max_tokens=1, temperature=0)
            except openai.APIStatusError as exc:
                if exc.status_code in (401, 403):
                    raise ExecutorError(
                        f"{where} rejected the API key from {self.config.key_env() or 'no variable (none sent)'}: "
                        f"{' '.join(describe(exc).split())}") from exc
                if not (exc.status_code in (408, 425, 429) or (exc.status_code >= 500 and exc.status_code != 501)):
                    hint = " - is it an OpenAI-compatible base URL ending in /v1?" if exc.status_code in (404, 405, 501) else ""
                    raise ExecutorError(f"{where} refused a test chat completion: "
                                        f"{' '.join(describe(exc).split())}{hint}") from exc
                first, last = first or exc, exc
                continue
            except Exception as exc:  # timeouts, dropped connections, a body that is not JSON
                first, last = first or exc, exc
                continue
            try:
                if not isinstance(response.choices[0].message.content, (str, type(None))):
                    raise TypeError("no message content")
            except (AttributeError, IndexError, TypeError) as exc:
                raise ExecutorError(f"{where} answered a test chat completion with something else than a "
                                    "chat completion - is it an OpenAI-compatible base URL ending in /v1?") from exc
            return
        assert first is not None and last is not None
        raise ExecutorError(f"{where} failed a test chat completion {tries} times (first: "
                            f"{' '.join(describe(first).split())}; last: {' '.join(describe(last).split())})") from last


class LLMCallError(RuntimeError):
    """A call that failed after its retries; recorded against the problem, not fatal."""
