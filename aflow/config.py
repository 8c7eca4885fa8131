"""Every tunable of the `aflow` core, with its default, in one place."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

# USD per million tokens (input, output). A model not listed is counted in tokens at cost 0.
PRICES_PER_MTOK: dict[str, tuple[float, float]] = {
    "gpt-4o-mini": (0.15, 0.60),
    "gpt-4o": (2.50, 10.00),
    "gpt-4.1-mini": (0.40, 1.60),
    "gpt-4.1-nano": (0.10, 0.40),
    "gpt-4.1": (2.00, 8.00),
    "claude-3-5-haiku-latest": (0.80, 4.00),
    "claude-sonnet-4-5": (3.00, 15.00),
    "deepseek-chat": (0.27, 1.10),
}

# Which variable holds the key for a known host; local servers need none.
KEY_ENV_BY_HOST = {
    "api.openai.com": "OPENAI_API_KEY",
    "api.anthropic.com": "ANTHROPIC_API_KEY",
    "api.deepseek.com": "DEEPSEEK_API_KEY",
    "openrouter.ai": "OPENROUTER_API_KEY",
    "api.together.xyz": "TOGETHER_API_KEY",
    "generativelanguage.googleapis.com": "GEMINI_API_KEY",
}
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1", "0.0.0.0"}


def default_cache_path() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "aflow" / "llm-cache.sqlite"


@dataclass
class LLMConfig:
    """An OpenAI-compatible chat endpoint (OpenAI, vLLM, SGLang, llama.cpp, Ollama, Anthropic)."""

    base_url: str = ""
    model: str = ""
    api_key_env: str | None = None  # None: inferred from the host (see KEY_ENV_BY_HOST)
    temperature: float = 0.0
    max_tokens: int = 512
    timeout: float = 120.0
    max_concurrency: int = 32
    max_retries: int = 4
    backoff_base: float = 0.5
    backoff_max: float = 20.0
    cache: bool | None = None  # None: on exactly when temperature == 0
    cache_path: Path = field(default_factory=default_cache_path)
    prices: dict[str, tuple[float, float]] = field(default_factory=lambda: dict(PRICES_PER_MTOK))

    @property
    def cache_enabled(self) -> bool:
        return self.temperature == 0 if self.cache is None else self.cache

    def key_env(self) -> str | None:
        """The variable to read the key from, or None when the server needs no key."""
        if self.api_key_env:
            return self.api_key_env
        host = (urlparse(self.base_url).hostname or "").lower()
        if host in LOCAL_HOSTS or host.startswith("127."):
            return None
        # An unknown host gets no key unless api_key_env names one: never send a provider's key
        # (OPENAI_API_KEY) to a third party; a host that needs one answers 401, which check() reports.
        return KEY_ENV_BY_HOST.get(host)

    def price(self) -> tuple[float, float]:
        return self.prices.get(self.model, (0.0, 0.0))


@dataclass
class EvalConfig:
    """One `aflow evaluate` run."""

    benchmark: str
    split: str = "validate"
    workflow: str = "builtin:io"
    limit: int | None = None
    concurrency: int = 8
    data_dir: Path | None = None
    out: Path | None = None
    # How outputs are scored (aflow.benchmarks.SCORING_VARIANTS): `aflow`, AFlow's own rules, so
    # numbers compare with the paper; `reward`, the hardened rules the RL environment optimises.
    scoring: str = "aflow"
    sample_temperature: float = 0.7  # repeats of a request within a run (aflow.operators.CallPolicy)
