"""Shared pieces of the LLM and instruction tests: a live server fixture and settings pointing at it."""

from __future__ import annotations

import pytest

from asclepius_r.llm import ChatRequest, LLMSettings
from support.default_settings import llm_settings
from support.openai_server import OpenAIServer

API_KEY = "sk-test-7f3a9c-never-in-outputs"
KEY_ENV = "ASCLEPIUS_TEST_API_KEY"


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setenv(KEY_ENV, API_KEY)
    with OpenAIServer() as running:
        yield running


def live_settings(server: OpenAIServer, archive, **overrides) -> LLMSettings:
    """Fast retries, short timeouts and no pacing to speak of, unless a test overrides them."""
    values = dict(
        backend="openai",
        model="gpt-4o-mini",
        base_url=server.url,
        api_key_env=KEY_ENV,
        approved_endpoints=[server.url],
        archive=str(archive) if archive else None,
        timeout_s=2.0,
        backoff_base_s=0.02,
        backoff_max_s=0.1,
        max_attempts=4,
        requests_per_minute=60_000,
        tokens_per_minute=1e9,
        max_concurrency=8,
        prices_per_million={"gpt-4o-mini": {"input": 0.15, "output": 0.60}},
        batch_poll_s=0.02,
    )
    values.update(overrides)
    return llm_settings(**values)


def requests(n: int, prefix: str = "synthetic note") -> list[ChatRequest]:
    return [
        ChatRequest(
            model="gpt-4o-mini",
            messages=(("user", f"{prefix} {i}: stable vital signs."),),
            max_tokens=64,
            meta={"row_id": 1000 + i, "phase": "question"},
        )
        for i in range(n)
    ]
