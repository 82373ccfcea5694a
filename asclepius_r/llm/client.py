"""The asynchronous LLM client: archive first, then pacing, retries, accounting and a budget.

`LLMClient.run(requests)` returns one ChatResult per request, in order. Archived successes are
reused and never sent again; everything sent is archived (fsynced) before it is used. Requests
go out concurrently under request-per-minute and token-per-minute limits; failures are retried
with jittered backoff (honouring Retry-After) and, when attempts run out, recorded as failed.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import Counter
from dataclasses import dataclass, field

from tqdm import tqdm

from .archive import Archive, ChatRequest, ChatResult
from .backends import FatalError, ReplayMissError, RetryableError, make_backend
from .guard import check_endpoint

log = logging.getLogger(__name__)


@dataclass
class LLMSettings:
    """The `llm` section of the config (see the schema for each key's meaning)."""

    backend: str = "replay"
    model: str = "gpt-4o-mini"
    base_url: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    azure_endpoint: str | None = None
    azure_deployment: str | None = None
    api_version: str | None = None
    approved_endpoints: list[str] = field(default_factory=list)
    archive: str | None = None
    temperature: float = 1.0
    max_tokens: int = 512
    max_concurrency: int = 16
    requests_per_minute: float = 500
    tokens_per_minute: float = 200_000
    max_attempts: int = 6
    timeout_s: float = 120
    backoff_base_s: float = 1.0
    backoff_max_s: float = 60.0
    retry_finish_reasons: list[str] = field(default_factory=lambda: ["length", "content_filter"])
    prices_per_million: dict = field(default_factory=dict)  # model -> {"input": $, "output": $}
    budget_usd: float | None = None

    @classmethod
    def from_config(cls, section: dict) -> "LLMSettings":
        known = {k: v for k, v in section.items() if k in cls.__dataclass_fields__}
        return cls(**known)


class BudgetExceededError(RuntimeError):
    pass


def estimate_tokens(request: ChatRequest) -> int:
    """A cheap upper-ish estimate before sending: ~4 characters per token plus the output cap."""
    chars = sum(len(content) for _, content in request.messages)
    return chars // 4 + 8 * len(request.messages) + request.max_tokens


class RateLimiter:
    """Sliding one-minute windows over requests and tokens; corrected by reported usage."""

    def __init__(self, rpm: float, tpm: float):
        self.rpm, self.tpm = rpm, tpm
        self.events: list[tuple[float, int]] = []  # (time, tokens)
        self.lock = asyncio.Lock()
        self.paused_until = 0.0

    def _prune(self, now: float) -> None:
        while self.events and self.events[0][0] <= now - 60:
            self.events.pop(0)

    async def acquire(self, tokens: int) -> int:
        async with self.lock:
            while True:
                now = time.monotonic()
                self._prune(now)
                used = sum(t for _, t in self.events)
                waits = [self.paused_until - now]
                if len(self.events) >= self.rpm:
                    waits.append(self.events[0][0] + 60 - now)
                if self.events and used + tokens > self.tpm:
                    waits.append(self.events[0][0] + 60 - now)
                wait = max(waits)
                if wait <= 0:
                    self.events.append((now, tokens))
                    return len(self.events) - 1
                await asyncio.sleep(min(wait, 5.0))

    def correct(self, estimated: int, actual: int) -> None:
        """Replace an estimate by the usage the server reported (most recent matching entry)."""
        for i in range(len(self.events) - 1, -1, -1):
            if self.events[i][1] == estimated:
                self.events[i] = (self.events[i][0], actual)
                return

    def pause(self, seconds: float) -> None:
        self.paused_until = max(self.paused_until, time.monotonic() + seconds)

    def observe_headers(self, headers: dict) -> None:
        """If the server says a window is exhausted, wait for its reset."""
        for kind in ("requests", "tokens"):
            remaining = headers.get(f"x-ratelimit-remaining-{kind}")
            reset = headers.get(f"x-ratelimit-reset-{kind}")
            if remaining is not None and reset and _as_float(remaining) == 0:
                self.pause(_parse_duration(reset))


def _as_float(value) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _parse_duration(value: str) -> float:
    """OpenAI reset headers look like '1s', '6m0s', '250ms'."""
    value, total, number = str(value).strip(), 0.0, ""
    units = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
    i = 0
    while i < len(value):
        ch = value[i]
        if ch.isdigit() or ch == ".":
            number += ch
            i += 1
            continue
        unit = "ms" if value.startswith("ms", i) else ch
        total += float(number or 0) * units.get(unit, 1.0)
        number = ""
        i += len(unit)
    return total + (float(number) if number else 0.0)


class LLMClient:
    def __init__(self, settings: LLMSettings, backend=None, archive: Archive | None = None):
        self.settings = settings
        check_endpoint(settings)
        self.backend = backend or make_backend(settings)
        self.archive = archive or Archive(settings.archive)
        self.stats: Counter = Counter()
        self.cost_usd = 0.0

    def price(self, usage: dict) -> float:
        table = self.settings.prices_per_million.get(self.settings.model)
        if not table or not usage:
            return 0.0
        return (usage.get("prompt_tokens", 0) * table["input"] + usage.get("completion_tokens", 0) * table["output"]) / 1e6

    def _worst_case_cost(self, request: ChatRequest) -> float:
        estimate = estimate_tokens(request)
        return self.price({"prompt_tokens": estimate - request.max_tokens, "completion_tokens": request.max_tokens})

    def run(self, requests: list[ChatRequest], desc: str = "LLM requests") -> list[ChatResult]:
        return asyncio.run(self.run_async(requests, desc))

    async def run_async(self, requests: list[ChatRequest], desc: str = "LLM requests") -> list[ChatResult]:
        results: list[ChatResult | None] = [None] * len(requests)
        pending = []
        for i, request in enumerate(requests):
            cached = self.archive.get(request)
            if cached is not None:
                results[i] = cached
                self.stats["archived"] += 1
            else:
                pending.append(i)
        if not pending:
            return results
        limiter = RateLimiter(self.settings.requests_per_minute, self.settings.tokens_per_minute)
        semaphore = asyncio.Semaphore(self.settings.max_concurrency)
        reserved = {"usd": 0.0}
        stop = asyncio.Event()
        with tqdm(total=len(pending), desc=desc, unit="req", disable=None, mininterval=2) as bar:
            async def one(i: int) -> None:
                async with semaphore:
                    if stop.is_set():
                        return
                    worst = self._worst_case_cost(requests[i])
                    budget = self.settings.budget_usd
                    if budget is not None and self.cost_usd + reserved["usd"] + worst > budget:
                        stop.set()
                        return
                    reserved["usd"] += worst
                    try:
                        results[i] = await self._send_with_retries(requests[i], limiter)
                    finally:
                        reserved["usd"] -= worst
                    bar.update(1)
                    bar.set_postfix(failed=self.stats["failed"], usd=f"{self.cost_usd:.2f}")

            await asyncio.gather(*(one(i) for i in pending))
        if stop.is_set():
            raise BudgetExceededError(
                f"llm.budget_usd = {self.settings.budget_usd} would be crossed: stopped after spending "
                f"${self.cost_usd:.2f}; everything received is archived, so raising the budget and "
                "rerunning continues where this run stopped"
            )
        return results

    async def _send_with_retries(self, request: ChatRequest, limiter: RateLimiter) -> ChatResult:
        settings = self.settings
        attempts, last_kind, last_error = 0, "", ""
        started = time.time()
        while attempts < settings.max_attempts:
            attempts += 1
            estimate = estimate_tokens(request)
            await limiter.acquire(estimate)
            try:
                result, headers = await self.backend.send(request)
            except ReplayMissError:
                raise
            except RetryableError as err:
                self.stats[f"retry_{err.kind}"] += 1
                last_kind, last_error = err.kind, str(err)
                if err.retry_after:
                    limiter.pause(err.retry_after)
                await asyncio.sleep(self._backoff(attempts, err.retry_after))
                continue
            except FatalError as err:
                last_kind, last_error = err.kind, str(err)
                break
            limiter.observe_headers(headers)
            if result.usage:
                limiter.correct(estimate, result.usage.get("total_tokens", estimate))
            self.cost_usd += self.price(result.usage)
            self.stats["prompt_tokens"] += result.usage.get("prompt_tokens", 0)
            self.stats["completion_tokens"] += result.usage.get("completion_tokens", 0)
            if result.finish_reason in settings.retry_finish_reasons:
                self.stats[f"retry_finish_{result.finish_reason}"] += 1
                last_kind, last_error = f"finish_{result.finish_reason}", f"finish_reason={result.finish_reason}"
                await asyncio.sleep(self._backoff(attempts, None))
                continue
            result.attempts, result.started = attempts, started
            self.archive.append(request, result)
            self.stats["sent_ok"] += 1
            return result
        failed = ChatResult(key=request.key, status="failed", error=f"{last_kind}: {last_error}"[:500],
                            attempts=attempts, started=started, finished=time.time())
        self.archive.append(request, failed)
        self.stats["failed"] += 1
        self.stats[f"failed_{last_kind}"] += 1
        log.warning("%s failed after %d attempt(s): %s", request.describe(), attempts, last_kind)
        return failed

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        base = min(self.settings.backoff_max_s, self.settings.backoff_base_s * 2 ** (attempt - 1))
        delay = random.uniform(0.5 * base, base)  # jitter spreads retries from many requests
        return max(delay, retry_after or 0.0)
