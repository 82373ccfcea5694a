"""The LLM client against a real local OpenAI-compatible server with injected faults: nothing lost,
nothing delivered twice, every failure counted; pacing, Retry-After, budget, guard and secrets."""

from __future__ import annotations

import asyncio
import json
import logging
import time

import pytest

from asclepius_r.llm import (
    Archive,
    BudgetExceededError,
    LLMClient,
    ReplayMissError,
    UnapprovedEndpointError,
)
from asclepius_r.llm.client import InFlightLimit, RateLimiter, parse_duration
from support.default_settings import llm_settings
from tests.llm_fixtures import API_KEY, live_settings, requests, server  # noqa: F401 (fixture)


def test_every_fault_is_retried_counted_and_nothing_is_lost_or_delivered_twice(server, tmp_path):
    archive = tmp_path / "archive.jsonl"
    server.add_fault("rate_limit", times=2, retry_after=0.05)
    server.add_fault("server_error", times=2)
    server.add_fault("stall", times=1, stall_s=3.0)
    server.add_fault("malformed", times=2)
    server.add_fault("no_choices", times=1)
    server.add_fault("length", times=2)
    server.add_fault("content_filter", times=1)
    client = LLMClient(live_settings(server, archive, timeout_s=1.0))
    batch = requests(40)
    results = client.run(batch)

    assert [r.key for r in results] == [r.key for r in batch] and all(r.ok for r in results)
    assert all(r.text.startswith("The discharge summary documents") for r in results)
    assert max(server.delivered().values()) == 1 and len(server.delivered()) == 40
    stats = client.stats
    expected = {
        "rate_limited": 2,
        "server_error": 2,
        "timeout": 1,
        "malformed": 3,
        "finish_length": 2,
        "finish_content_filter": 1,
    }
    assert {k: v for k, v in stats["retries"].items() if v} == expected
    assert stats["sent_ok"] == 40 and stats["failed"] == 0 and stats["attempts"] == 40 + sum(expected.values())
    # Every reply that came back, usable or not, and the attempt that timed out may be billed: each
    # is charged (at its usage, or the worst case when it reports none) and archived for the budget.
    assert stats["usage"]["billed_responses"] == 47 and stats["cost_usd"] > 0
    lines = [json.loads(line) for line in archive.read_text().splitlines()]
    assert sorted(r["result"]["status"] for r in lines) == ["ok"] * 40 + ["retry"] * 7


def test_exhausted_attempts_are_recorded_as_failed_and_a_rerun_tries_again(server, tmp_path, caplog):
    archive = tmp_path / "archive.jsonl"
    server.add_fault("server_error", times=None, match="synthetic note 3:")
    batch = requests(6)
    with caplog.at_level(logging.WARNING):
        results = LLMClient(live_settings(server, archive)).run(batch)
    assert [r.ok for r in results] == [True, True, True, False, True, True]
    assert results[3].status == "failed" and results[3].attempts == 4 and results[3].error.startswith("server_error")
    assert Archive(archive).get(batch[3], include_failed=True).status == "failed"
    assert "row_id=1003" in caplog.text and "synthetic note 3" not in caplog.text

    server.faults.clear()
    before = len(server.chat_requests())
    rerun = LLMClient(live_settings(server, archive))
    assert all(r.ok for r in rerun.run(batch))
    assert len(server.chat_requests()) == before + 1  # only the failed one is sent again
    assert rerun.stats["archived"] == 5 and rerun.stats["sent_ok"] == 1


def test_a_rerun_sends_nothing_that_is_archived(server, tmp_path):
    archive = tmp_path / "archive.jsonl"
    first = LLMClient(live_settings(server, archive)).run(requests(12))
    sent = len(server.chat_requests())
    again = LLMClient(live_settings(server, archive))
    second = again.run(requests(12))
    assert len(server.chat_requests()) == sent == 12
    assert [r.text for r in second] == [r.text for r in first] and again.stats["archived"] == 12


def test_fatal_errors_are_not_retried_and_neither_key_nor_note_reaches_logs_or_archive(server, tmp_path, caplog):
    archive = tmp_path / "archive.jsonl"
    server.add_fault("http_error", status=400, times=None, echo_request=True, match="synthetic note 2:")
    client = LLMClient(live_settings(server, archive))
    with caplog.at_level(logging.DEBUG):
        results = client.run(requests(4))
    assert [r.ok for r in results] == [True, True, False, True]
    assert results[2].attempts == 1 and client.stats["failures"]["http_400"] == 1
    assert results[2].error.startswith("http_400: HTTP 400")  # what failed, not what the server said
    assert API_KEY not in archive.read_text() and API_KEY not in caplog.text
    assert "stable vital signs" not in caplog.text
    assert any(API_KEY in (r.authorization or "") for r in server.requests)  # the key was really sent


def test_retry_after_is_honoured(server, tmp_path):
    server.add_fault("rate_limit", times=1, retry_after=0.6, match="synthetic note 0:")
    LLMClient(live_settings(server, tmp_path / "a.jsonl", backoff_max_s=5.0)).run(requests(1))
    first, retry = server.chat_requests()
    assert first.outcome == "rate_limit" and retry.outcome == "ok"
    assert retry.received - first.answered >= 0.6


def test_requests_are_paced_to_the_requests_per_minute_limit(server, tmp_path):
    client = LLMClient(live_settings(server, tmp_path / "a.jsonl", requests_per_minute=600, max_concurrency=16))
    started = time.monotonic()
    client.run(requests(25))
    elapsed = time.monotonic() - started
    times = sorted(r.received for r in server.chat_requests())
    # one every 0.1 s: 25 requests need 2.4 s, and no second holds more than 10 (+1 at its edges)
    assert elapsed >= 2.3
    assert max(sum(1 for t in times if s <= t < s + 1.0) for s in times) <= 11


def test_requests_in_flight_follow_littles_law_within_the_cap():
    limit = InFlightLimit(requests_per_minute=600, cap=64)  # 10 requests a second
    assert limit.limit == 40  # nothing observed yet: 2 s assumed
    for _ in range(10):
        limit.observe(1.5)
    assert limit.limit == 30  # 10/s x 1.5 s x 2
    for _ in range(InFlightLimit.WINDOW):
        limit.observe(0.01)
    assert limit.limit == InFlightLimit.FLOOR  # only the latest answers count
    limit.observe(10_000.0)  # a stuck request pulls the mean up: never past the cap
    assert limit.limit == 64


def test_slots_wait_for_the_limit_and_wake_when_one_is_freed():
    async def scenario():
        limit = InFlightLimit(requests_per_minute=60, cap=2)
        most = 0

        async def one():
            nonlocal most
            async with limit.slot():
                most = max(most, limit.running)
                await asyncio.sleep(0.01)

        await asyncio.gather(*(one() for _ in range(7)))
        return most, limit.running

    assert asyncio.run(scenario()) == (2, 0)


def test_token_limit_waits_for_the_estimate_and_is_corrected_by_reported_usage():
    async def scenario():
        limiter = RateLimiter(rpm=1e6, tpm=6000)  # 100 tokens a second
        await limiter.acquire(100)
        started = time.monotonic()
        await limiter.acquire(100)  # waits a second for the first one's estimate
        waited = time.monotonic() - started
        limiter.correct(100, 10)  # it really used 10 tokens: 0.9 s refunded
        started = time.monotonic()
        await limiter.acquire(10)
        return waited, time.monotonic() - started

    waited, after_refund = asyncio.run(scenario())
    assert 0.9 <= waited and after_refund < 0.5


def test_exhausted_rate_limit_headers_pause_the_client_up_to_the_cap():
    limiter = RateLimiter(rpm=1e6, tpm=1e9, max_pause_s=120)
    limiter.observe_headers({"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "1m0.5s"})
    assert limiter.paused_until - time.monotonic() == pytest.approx(60.5, abs=0.5)
    limiter.observe_headers({"x-ratelimit-remaining-tokens": "0", "x-ratelimit-reset-tokens": "8760h"})
    assert limiter.paused_until - time.monotonic() == pytest.approx(120, abs=0.5)  # a year is cut to the cap
    assert parse_duration("6m0s") == 360 and parse_duration("250ms") == 0.25 and parse_duration("2") == 2
    assert [parse_duration(v) for v in (".", "nan", "-5s", "1e999", "soon")] == [0, 0, 0, 0, 0]


def test_budget_stops_cleanly_before_it_is_crossed_and_a_rerun_continues(server, tmp_path):
    archive = tmp_path / "archive.jsonl"
    prices = {"gpt-4o-mini": {"input": 1000.0, "output": 1000.0}}  # about $0.08 worst case a request
    client = LLMClient(live_settings(server, archive, prices_per_million=prices, budget_usd=0.5, max_concurrency=2))
    with pytest.raises(BudgetExceededError, match="llm.budget_usd"):
        client.run(requests(20))
    assert 0 < client.cost_usd <= 0.5
    spent = len(server.chat_requests())
    assert 0 < spent < 20

    rerun = LLMClient(live_settings(server, archive, prices_per_million=prices, budget_usd=None))
    assert all(r.ok for r in rerun.run(requests(20)))
    assert max(server.delivered().values()) == 1 and len(server.chat_requests()) == 20


def test_unapproved_endpoint_is_refused_before_any_request(server, tmp_path):
    with pytest.raises(UnapprovedEndpointError) as refused:
        LLMClient(live_settings(server, tmp_path / "a.jsonl", approved_endpoints=["https://elsewhere.example/v1"]))
    message = str(refused.value)
    assert "PhysioNet" in message and "approved_endpoints" in message and server.url in message
    assert server.requests == []


def test_azure_backend_calls_the_deployment_and_archives_it(server, tmp_path):
    endpoint = f"{server.endpoint}/openai/deployments/gpt-4o-mini-zdr"
    settings = live_settings(
        server,
        tmp_path / "a.jsonl",
        backend="azure",
        base_url=None,
        azure_endpoint=server.endpoint,
        azure_deployment="gpt-4o-mini-zdr",
        api_version="2024-10-21",
        approved_endpoints=[endpoint],
    )
    results = LLMClient(settings).run(requests(3))
    assert all(r.ok for r in results)
    assert {(r.deployment, r.query.get("api-version"), r.authorization) for r in server.chat_requests()} == {
        ("gpt-4o-mini-zdr", "2024-10-21", API_KEY)
    }
    assert results[0].provider["deployment"] == "gpt-4o-mini-zdr" and results[0].provider["api_version"] == "2024-10-21"
    assert results[0].provider["system_fingerprint"] == "fp_test"


def test_azure_settings_missing_are_named(server, tmp_path):
    with pytest.raises(ValueError, match="llm.azure_deployment"):
        LLMClient(
            live_settings(
                server, tmp_path / "a.jsonl", backend="azure", azure_endpoint=server.endpoint, api_version="2024-10-21"
            )
        )


def test_api_key_only_from_the_environment(server, tmp_path, monkeypatch):
    monkeypatch.delenv("ASCLEPIUS_TEST_API_KEY")
    with pytest.raises(Exception, match="ASCLEPIUS_TEST_API_KEY"):
        LLMClient(live_settings(server, tmp_path / "a.jsonl"))


def test_replay_miss_names_the_request(tmp_path):
    client = LLMClient(llm_settings(backend="replay", archive=str(tmp_path / "empty.jsonl")))
    with pytest.raises(ReplayMissError, match="row_id=1000"):
        client.run(requests(1))
