"""The asynchronous LLM client: archive first, then pacing, retries, accounting and a budget.

`LLMClient.run(requests)` returns one ChatResult per request, in order; `await client.ask(request)`
returns one, for pipelines whose next requests depend on earlier answers (run them with
`client.drive`). Archived successes are reused and never sent again; everything sent is archived
(fsynced) before it is used. Online, requests go out concurrently, paced to the request-per-minute
and token-per-minute limits, with as many in flight as the rate needs at the observed latency;
failures are retried with jittered backoff (honouring Retry-After up to `llm.backoff_max_s`)
and, when attempts run out, recorded as failed, never dropped. `llm.mode: batch` sends the same
requests through the Batch API instead (see batch.py). Logs name requests by key and ROW_ID
only, never by their text.

The budget holds whatever a server reports: each attempt reserves its worst case before it is
sent (`ChatRequest.worst_case_usage`), and an attempt that may have been billed without a usable
usage report (a reply without usage, a malformed reply, a timeout, a connection lost after
sending) is charged and archived at that worst case. What leaves the client passes one exit:
results (returned and archived) through `_outbound`, errors through `_exit` (redact.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import re
import time
from collections import Counter, deque
from dataclasses import asdict, dataclass, replace

import httpx2
from tqdm import tqdm

from asclepius_r.config import ConfigError
from asclepius_r.errors import UserError
from asclepius_r.llm.archive import Archive, ChatRequest, ChatResult, hold_archive, let_go_of_archive
from asclepius_r.llm.backends import FatalError, ProviderError, ReplayMissError, RetryableError, make_backend
from asclepius_r.llm.guard import check_endpoint
from asclepius_r.llm.redact import Redactor, ReplyRefused, describe_error

log = logging.getLogger(__name__)

# Every way a request can need another attempt or end as failed; zero counts are reported too.
RETRY_KINDS = (
    "rate_limited",
    "server_error",
    "timeout",
    "connection",
    "malformed",
    "http_408",
    "http_409",
    "finish_length",
    "finish_content_filter",
    "batch_error",
    "batch_missing",
)
FAILURE_KINDS = RETRY_KINDS + ("content_filter_prompt", "http_400", "http_401", "http_403", "http_404")
ERROR_CHARS = 500  # of a server's error text kept in the archive


@dataclass
class LLMSettings:
    """The `llm` section of the config (see the schema for each key's meaning and default)."""

    backend: str
    mode: str
    model: str
    base_url: str | None
    proxy: str | None
    api_key_env: str
    azure_endpoint: str | None
    azure_deployment: str | None
    api_version: str | None
    approved_endpoints: list[str]
    archive: str | None
    temperature: float
    max_tokens: int
    max_concurrency: int  # a cap: the client keeps the rate times the latency in flight
    requests_per_minute: float
    tokens_per_minute: float
    max_attempts: int
    timeout_s: float
    backoff_base_s: float
    backoff_max_s: float
    retry_finish_reasons: list[str]
    prices_per_million: dict  # model -> {"input": $, "output": $}
    budget_usd: float | None
    batch_discount: float
    batch_poll_s: float
    batch_max_requests: int
    batch_max_bytes: int
    batch_delete_files: bool

    @classmethod
    def from_config(cls, section: dict) -> LLMSettings:
        known = {k: v for k, v in section.items() if k in cls.__dataclass_fields__}
        return cls(**known)

    def check(self) -> None:
        """Settings that only make sense together; the message names the config keys."""
        if not ENV_NAME.fullmatch(self.api_key_env) or (len(self.api_key_env) >= 24 and "_" not in self.api_key_env):
            # Users paste the key itself here; the message must not repeat it.
            raise ConfigError(
                "llm.api_key_env must name an environment variable (capital letters, digits, '_'), such as "
                "OPENAI_API_KEY; its value looks like a key itself and is not shown. Put the key in that "
                "variable, never in a config file, and revoke a key that was written into one."
            )
        if self.backend == "azure":
            missing = [k for k in ("azure_endpoint", "azure_deployment", "api_version") if not getattr(self, k)]
            if missing:
                raise ConfigError("llm.backend is 'azure' but " + ", ".join(f"llm.{k}" for k in missing) + " not set")
        if self.budget_usd is not None and self.backend != "replay" and self.model not in self.prices_per_million:
            raise ConfigError(
                f"llm.budget_usd is set but model {self.model!r} has no price in llm.prices_per_million, so the "
                f"budget could not count its cost; add `{self.model}: {{input: USD, output: USD}}` (per million tokens)"
            )
        if self.budget_usd is not None and self.backend != "replay" and not self.archive:
            raise ConfigError(
                "llm.budget_usd is set but the archive is null (llm.archive; judge.archive for the judge): the "
                "budget counts the archive's spending across runs, and without one every rerun would send and pay "
                "for every request again. Set the archive, or remove the budget."
            )
        if self.backend == "replay" and not self.archive:
            raise ConfigError("llm.backend is 'replay' but llm.archive is not set: replay needs an archive")
        if self.mode == "batch" and self.backend == "replay":
            raise ConfigError("llm.mode 'batch' needs a live backend (openai or azure), not 'replay'")

    def price(self, usage: dict, batch: bool = False, model: str | None = None) -> float:
        """Dollars for `usage` (prompt and completion tokens) of `model` (default: llm.model) at
        `prices_per_million`; 0 when the model has no price. The one pricing rule: the client's
        accounting, its budget over the archive and the plan all use it."""
        table = self.prices_per_million.get(model or self.model)
        if not table or not usage:
            return 0.0
        cost = (
            usage.get("prompt_tokens", 0) * table["input"] + usage.get("completion_tokens", 0) * table["output"]
        ) / 1e6
        return cost * (self.batch_discount if batch else 1.0)


# The shape of an environment variable's name; an API key never has it (dashes, lower case).
ENV_NAME = re.compile(r"[A-Z_][A-Z0-9_]*")


class BudgetExceededError(UserError, RuntimeError):
    """The next request would cross `llm.budget_usd`."""


def estimate_tokens(request: ChatRequest) -> int:
    """An upper-ish estimate before sending: ~4 characters per token plus the output cap."""
    chars = sum(len(content) for _, content in request.messages)
    return chars // 4 + 8 * len(request.messages) + request.max_tokens


class Pacer:
    """A generic cell rate limiter (GCRA) for `limit` units per minute.

    Each admission moves a virtual clock forward by its cost in time and the next one waits
    for that clock, so the long-run rate is exactly the limit. Unlike a one-minute sliding
    window it never sends a whole minute's quota at once and then idles, which trips providers
    that enforce the limit over short windows (Azure: 1-10 s) and then costs Retry-After pauses.
    A sender woken late by a busy event loop may catch up by at most `catch_up_s`, so small
    delays are not lost from the rate while bursts stay that small.
    """

    def __init__(self, limit_per_minute: float, catch_up_s: float = 0.1):
        self.interval = 60.0 / limit_per_minute
        self.catch_up_s = catch_up_s
        self.clock: float | None = None

    def delay(self, now: float) -> float:
        return 0.0 if self.clock is None else self.clock - now

    def take(self, now: float, cost: float) -> None:
        start = now if self.clock is None else max(self.clock, now - self.catch_up_s)
        self.clock = start + cost * self.interval

    def refund(self, cost: float) -> None:
        if self.clock is not None:
            self.clock -= cost * self.interval


class InFlightLimit:
    """How many requests may be in flight: by Little's law, the rate times the mean latency.

    Sustaining `rate` requests per second when each takes `latency` seconds on average needs
    rate x latency of them in flight; the count fluctuates around that (by about its square root,
    more under a long tail) and the first answers back are the fast ones, which make the mean
    too low for a while, so the limit keeps `MARGIN` times as many, never more than `cap`. Those
    beyond what the rate needs wait in the pacer, costing nothing.
    The mean is over the latest `WINDOW` attempts, so it follows the endpoint as it slows down or
    speeds up. Until the first answer it assumes `INITIAL_LATENCY_S`, not the cap: at a high limit
    hundreds of requests would enter the SDK's connection pool at once, whose bookkeeping costs CPU
    in proportion to the requests waiting in it; a slower endpoint raises the limit one latency later.
    """

    MARGIN = 2.0
    WINDOW = 512
    FLOOR = 4
    INITIAL_LATENCY_S = 2.0

    def __init__(self, requests_per_minute: float, cap: int):
        self.rate = requests_per_minute / 60
        self.cap = cap
        self.latencies: deque[float] = deque(maxlen=self.WINDOW)
        self.latency_sum = 0.0
        self.running = 0
        self.changed = asyncio.Condition()

    @property
    def limit(self) -> int:
        mean = self.latency_sum / len(self.latencies) if self.latencies else self.INITIAL_LATENCY_S
        return max(min(self.FLOOR, self.cap), min(self.cap, math.ceil(self.rate * mean * self.MARGIN)))

    def observe(self, seconds: float) -> None:
        if len(self.latencies) == self.latencies.maxlen:
            self.latency_sum -= self.latencies[0]
        self.latencies.append(seconds)
        self.latency_sum += seconds

    @contextlib.asynccontextmanager
    async def slot(self):
        async with self.changed:
            await self.changed.wait_for(lambda: self.running < self.limit)
            self.running += 1
        try:
            yield
        finally:
            async with self.changed:
                self.running -= 1
                # wake as many waiters as there are free slots (the limit may have grown), not all
                self.changed.notify(max(1, self.limit - self.running))


class RateLimiter:
    """Requests and tokens per minute, server pauses (Retry-After, exhausted x-ratelimit windows)."""

    # Aim this far under the configured limits, so that timing jitter and catch-up never
    # cross them: one 429 costs a Retry-After pause of every request, far more than 2%.
    HEADROOM = 0.98

    def __init__(self, rpm: float, tpm: float, max_pause_s: float = 60.0):
        self.requests = Pacer(rpm * self.HEADROOM)
        self.tokens = Pacer(tpm * self.HEADROOM)
        self.max_pause_s = max_pause_s
        self.paused_until = 0.0
        self.lock = asyncio.Lock()

    async def acquire(self, tokens: int) -> None:
        async with self.lock:  # FIFO: the first waiter goes first
            while True:
                now = time.monotonic()
                wait = max(self.paused_until - now, self.requests.delay(now), self.tokens.delay(now))
                if wait <= 0:
                    self.requests.take(now, 1)
                    self.tokens.take(now, tokens)
                    return
                await asyncio.sleep(wait)

    def correct(self, estimated: int, actual: int) -> None:
        """Replace a token estimate by the usage the server reported."""
        self.tokens.refund(estimated - actual)

    def pause(self, seconds: float) -> None:
        """Send nothing for `seconds`, at most `max_pause_s` (a server may ask for a year)."""
        if seconds > 0:  # also false for NaN
            self.paused_until = max(self.paused_until, time.monotonic() + min(seconds, self.max_pause_s))

    def observe_headers(self, headers: dict) -> None:
        """If the server says a window is exhausted, wait for its reset."""
        for kind in ("requests", "tokens"):
            remaining = headers.get(f"x-ratelimit-remaining-{kind}")
            reset = headers.get(f"x-ratelimit-reset-{kind}")
            if remaining is not None and reset and _as_float(remaining) == 0:
                self.pause(parse_duration(reset))


def _as_float(value) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ms|h|m|s)?")
DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "": 1.0}


def parse_duration(value: str) -> float:
    """OpenAI reset headers look like '1s', '6m0s', '250ms' or a bare number of seconds; what
    does not read as a duration is 0 (no pause)."""
    text = str(value).strip()[:64]
    if not re.fullmatch(f"(?:{DURATION_PART.pattern})+", text):
        return 0.0
    return sum(float(number) * DURATION_UNITS[unit] for number, unit in DURATION_PART.findall(text))


class LLMClient:
    """Runs requests through the archive and a backend; counts usage, cost and every failure kind."""

    def __init__(self, settings: LLMSettings, backend=None, archive: Archive | None = None):
        settings.check()
        self.settings = settings
        check_endpoint(settings)
        # Held for the client's (the stage's) life; replay sends nothing, so it may share an archive.
        self._held = hold_archive(settings.archive) if settings.archive and settings.backend != "replay" else None
        try:
            self.backend = backend or make_backend(settings)
            self.redact = Redactor.for_settings(settings, getattr(self.backend, "secret", None))
            self.archive = archive if archive is not None else Archive(settings.archive)  # an empty one is falsy
        except BaseException:
            self._let_go()
            raise
        if settings.mode == "batch":
            from asclepius_r.llm.batch import warn_provider_storage

            warn_provider_storage(settings)
        self.counts: Counter = Counter()
        self.cost_usd = 0.0
        # The budget is the archive's: what earlier runs, jobs and retries spent counts too.
        self.spent_before_usd = sum(
            self.price(usage, batch, model) for (model, batch), usage in self.archive.billed.items()
        )
        if settings.budget_usd is not None:
            log.info(
                "llm.budget_usd = %s; the archive %s holds $%.4f spent by earlier runs",
                settings.budget_usd,
                settings.archive,
                self.spent_before_usd,
            )
        self.bar: tqdm | None = None
        self._reserved_usd = 0.0
        self._budget_hit = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._limiter: RateLimiter | None = None
        self._in_flight: InFlightLimit | None = None
        self._sent_at: deque[float] = deque()  # attempts of the last minute, for the progress bar
        self._asked: dict[str, asyncio.Future] = {}  # key -> the one ask sending it
        self._gathered: list[ChatRequest] = []  # batch mode: asked, not yet submitted
        self._gathering: asyncio.Future | None = None
        self._unwritten: list[tuple[ChatRequest, ChatResult, asyncio.Future]] = []  # for the archive writer
        self._writer: asyncio.Task | None = None
        self._earlier_batches_finished = False

    def close(self) -> None:
        """Close the SDK's connections inside the loop they belong to, then the loop; let go of the archive."""
        if self._loop is not None:
            aclose = getattr(getattr(self.backend, "client", None), "close", None)
            if aclose is not None:
                self._loop.run_until_complete(aclose())
            self._loop.close()
            self._loop = None
        self.archive.close()
        self._let_go()

    def _let_go(self) -> None:
        if self._held:
            let_go_of_archive(self._held)
            self._held = None

    def __enter__(self) -> LLMClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- accounting ------------------------------------------------------------------------
    def price(self, usage: dict, batch: bool = False, model: str | None = None) -> float:
        return self.settings.price(usage, batch, model)

    def worst_case_cost(self, request: ChatRequest, batch: bool = False) -> float:
        return self.price(request.worst_case_usage(), batch)

    def reserve(self, worst: float) -> bool:
        """Set aside the worst-case cost of one attempt; False (and stop) if the budget would be crossed."""
        budget = self.settings.budget_usd
        spent = self.spent_before_usd + self.cost_usd + self._reserved_usd
        if self._budget_hit or (budget is not None and spent + worst > budget):
            self._budget_hit = True
            return False
        self._reserved_usd += worst
        return True

    def release(self, worst: float) -> None:
        self._reserved_usd -= worst

    def account(self, result: ChatResult, batch: bool = False) -> None:
        """Count the usage and cost of one billed response (usable or not)."""
        self.cost_usd += self.price(result.usage, batch)
        self.counts["prompt_tokens"] += result.usage.get("prompt_tokens", 0)
        self.counts["completion_tokens"] += result.usage.get("completion_tokens", 0)
        self.counts["billed_responses"] += 1
        self.counts["billed_at_worst_case"] += result.usage_estimated

    def charge_unanswered(
        self, request: ChatRequest, err: RetryableError, attempts: int, batch: bool = False
    ) -> ChatResult:
        """The record of an attempt that may have been billed without a usable answer: charged at
        the usage its reply reported, or at the request's worst case (a timeout, no usage)."""
        result = ChatResult(
            key=request.key,
            status="retry",
            error=f"{err.kind}: {err}",
            usage=err.usage or request.worst_case_usage(),
            usage_estimated=err.usage is None,
            attempts=attempts,
            finished=time.time(),
        )
        self.account(result, batch)
        return self._outbound(result)

    def _outbound(self, result: ChatResult) -> ChatResult:
        """The one exit of results, returned and archived alike: every string in them redacted
        (redact.py), error text cut to ERROR_CHARS after that (a cut first could leave part of a
        key where redaction no longer recognises it)."""
        clean = ChatResult(**self.redact.value(asdict(result)))
        clean.error = clean.error[:ERROR_CHARS] if clean.error else clean.error
        return clean

    @contextlib.contextmanager
    def _exit(self):
        """The one exit of errors: one from the wire (the SDK, HTTP, a refused reply), which the
        retries did not absorb, leaves as ProviderError saying only what describe_error may say."""
        try:
            yield
        except UserError:
            raise
        except Exception as err:
            wire = _from_the_wire(err)
            if wire is None:
                raise
            raise ProviderError(self.redact(f"the LLM service failed: {describe_error(wire)}")) from None

    @property
    def stats(self) -> dict:
        """Everything counted so far, with every known failure kind listed (zeros included)."""
        counts = self.counts
        return {
            "mode": self.settings.mode,
            "requests": counts["requests"],
            "archived": counts["archived"],
            "sent_ok": counts["sent_ok"],
            "failed": counts["failed"],
            "attempts": counts["attempts"],
            "retries": {k: counts[f"retry_{k}"] for k in sorted({*RETRY_KINDS, *_seen(counts, "retry_")})},
            "failures": {k: counts[f"failed_{k}"] for k in sorted({*FAILURE_KINDS, *_seen(counts, "failed_")})},
            "usage": {
                "prompt_tokens": counts["prompt_tokens"],
                "completion_tokens": counts["completion_tokens"],
                "billed_responses": counts["billed_responses"],
                "billed_at_worst_case": counts["billed_at_worst_case"],
            },
            "cost_usd": round(self.cost_usd, 6),
        }

    # -- progress --------------------------------------------------------------------------
    @contextlib.contextmanager
    def progress(self, total: int, desc: str):
        """One progress bar (rate and ETA) over several `run` calls, e.g. a whole stage."""
        with tqdm(total=total, desc=desc, unit="req", mininterval=2, dynamic_ncols=True) as bar:
            self.bar = bar
            try:
                yield bar
            finally:
                self.bar = None

    def _advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)
            postfix = {"failed": self.counts["failed"], "usd": f"{self.cost_usd:.2f}"}
            if self._sent_at:  # requests per minute sent, against the limit (tqdm shows the time left)
                postfix["rpm"] = f"{self._recent_rpm():.0f}/{self.settings.requests_per_minute:g}"
                postfix["in_flight"] = f"{self._in_flight.running}/{self._in_flight.limit}"
            self.bar.set_postfix(postfix, refresh=False)

    def _recent_rpm(self) -> float:
        now = time.monotonic()
        while self._sent_at and self._sent_at[0] < now - 60:
            self._sent_at.popleft()
        return len(self._sent_at) / max(now - self._sent_at[0], 1.0) * 60 if self._sent_at else 0.0

    # -- running ---------------------------------------------------------------------------
    def drive(self, coroutine):
        """Run a coroutine to its end on the client's one event loop, to which the SDK's connection
        pool is bound (a fresh loop per call would strand it on a closed one)."""
        if self._loop is None:
            self._loop = asyncio.new_event_loop()
        return self._loop.run_until_complete(coroutine)

    def run(self, requests: list[ChatRequest], desc: str = "LLM requests") -> list[ChatResult]:
        """Run a list of requests synchronously (see `drive`)."""
        if self.bar is None:
            with self.progress(len(requests), desc):
                return self.drive(self.run_async(requests))
        return self.drive(self.run_async(requests))

    async def ask(self, request: ChatRequest) -> ChatResult | None:
        """One request's result, as soon as it is back: online it goes out at once (within the
        limits and the requests in flight); in batch mode the requests asked while every asker
        waits are submitted together. Asking for a request already on its way shares its answer."""
        with self._exit():
            shared = self._asked.get(request.key)
            if shared is None:
                shared = self._asked[request.key] = asyncio.ensure_future(self._ask_once(request))
                shared.add_done_callback(lambda _: self._asked.pop(request.key, None))
            return await asyncio.shield(shared)

    async def _ask_once(self, request: ChatRequest) -> ChatResult | None:
        if self.settings.mode != "batch":
            return (await self.run_async([request]))[0]
        self._gathered.append(request)
        if self._gathering is None:
            self._gathering = asyncio.ensure_future(self._submit_gathered())
        return (await asyncio.shield(self._gathering))[request.key]

    async def _submit_gathered(self, quiet_s: float = 0.2) -> dict[str, ChatResult | None]:
        """Wait until no request has been asked for `quiet_s` (every asker waits for an answer),
        then run all of them as one batch run: a batch takes hours, this wait nothing."""
        asked = -1
        while asked != len(self._gathered):
            asked = len(self._gathered)
            await asyncio.sleep(quiet_s)
        requests, self._gathered, self._gathering = self._gathered, [], None
        return dict(zip((r.key for r in requests), await self.run_async(requests)))

    async def run_async(self, requests: list[ChatRequest]) -> list[ChatResult]:
        with self._exit():
            return await self._run(requests)

    async def _run(self, requests: list[ChatRequest]) -> list[ChatResult]:
        replay = self.settings.backend == "replay"
        if not replay and not self._earlier_batches_finished:
            await self._finish_earlier_batches(requests)
        results: list[ChatResult | None] = [None] * len(requests)
        pending: dict[str, list[int]] = {}  # one send per distinct request, however often it appears
        for i, request in enumerate(requests):
            self.counts["requests"] += 1
            cached = self.archive.get(request, include_failed=replay)
            if cached is not None:
                results[i] = cached
                self.counts["archived"] += 1
                self._advance()
            else:
                pending.setdefault(request.key, []).append(i)
        if pending:
            unique = [requests[positions[0]] for positions in pending.values()]
            weights = {key: len(positions) for key, positions in pending.items()}  # for the progress bar
            if self.settings.mode == "batch":
                from asclepius_r.llm.batch import BatchRunner

                done = await BatchRunner(self).run(unique, weights)
            else:
                done = await self._run_online(unique, weights)
            for request, result in zip(unique, done):
                for i in pending[request.key]:
                    results[i] = result
        if self._budget_hit:
            raise BudgetExceededError(
                f"llm.budget_usd = {self.settings.budget_usd} would be crossed: the archive {self.settings.archive} "
                f"holds ${self.spent_before_usd + self.cost_usd:.4f} of spending (${self.cost_usd:.4f} in this run); "
                "everything received is archived, so raising the budget and rerunning continues where this run stopped"
            )
        return results

    async def _finish_earlier_batches(self, requests: list[ChatRequest]) -> None:
        """Before the client's first request goes out: batches an earlier run left in the journal
        are finished (batch.py), waited for if they hold `requests` not yet answered and this run is
        in batch mode, else cancelled; what they answered is archived and their files deleted, so
        that no request a batch answered is paid for again."""
        from asclepius_r.llm.batch import BatchJournal, BatchRunner

        self._earlier_batches_finished = True
        if self.archive.path is None or not BatchJournal(self.archive.path).entries:
            return
        batch = self.settings.mode == "batch"
        await BatchRunner(self).finish_earlier([r for r in requests if batch and self.archive.get(r) is None])

    async def _run_online(self, requests: list[ChatRequest], weights: dict[str, int]) -> list[ChatResult | None]:
        if self._limiter is None:  # one for the client's life: pacing carries over from run to run
            settings = self.settings
            rpm, tpm = settings.requests_per_minute, settings.tokens_per_minute
            self._limiter = RateLimiter(rpm, tpm, settings.backoff_max_s)
            self._in_flight = InFlightLimit(settings.requests_per_minute, settings.max_concurrency)
        limiter = self._limiter

        async def one(request: ChatRequest) -> ChatResult | None:
            async with self._in_flight.slot():
                result = await self._send_with_retries(request, limiter)
            self._advance(weights[request.key])
            return result

        return list(await asyncio.gather(*(one(r) for r in requests)))

    async def _send_with_retries(self, request: ChatRequest, limiter: RateLimiter) -> ChatResult | None:
        """Send until a usable answer or `max_attempts`; None if the budget stopped it unsent."""
        settings = self.settings
        attempts, last_kind, last_error = 0, "", ""
        started = time.time()
        while attempts < settings.max_attempts:
            worst = self.worst_case_cost(request)
            if not self.reserve(worst):
                return None
            attempts += 1
            estimate = estimate_tokens(request)
            try:
                await limiter.acquire(estimate)
                self.counts["attempts"] += 1
                sent = time.monotonic()
                self._sent_at.append(sent)
                try:
                    result, headers = await self.backend.send(request)
                finally:
                    self._in_flight.observe(time.monotonic() - sent)
            except ReplayMissError:
                raise
            except RetryableError as err:
                self.counts[f"retry_{err.kind}"] += 1
                last_kind, last_error = err.kind, str(err)
                if err.billed:
                    await self._archive(request, self.charge_unanswered(request, err, attempts))
                limiter.observe_headers(err.headers)
                if err.retry_after:
                    limiter.pause(err.retry_after)
                await asyncio.sleep(self.backoff(attempts, err.retry_after))
                continue
            except FatalError as err:
                last_kind, last_error = err.kind, str(err)
                break
            finally:
                self.release(worst)
            limiter.observe_headers(headers)
            if not result.usage_estimated:
                limiter.correct(estimate, sum(result.usage.get(k, 0) for k in ("prompt_tokens", "completion_tokens")))
            result.attempts, result.started = attempts, started
            record, usable = self._settled(request, result)
            await self._archive(request, record)
            if usable:
                return record
            last_kind, last_error = f"finish_{result.finish_reason}", f"finish_reason={result.finish_reason}"
            await asyncio.sleep(self.backoff(attempts, None))
        return self.record_failure(request, last_kind, last_error, attempts, started)

    def settle(self, request: ChatRequest, result: ChatResult, batch: bool = False) -> tuple[ChatResult, bool]:
        """Account and archive a billed response: the record, and whether it is usable."""
        record, usable = self._settled(request, result, batch)
        self.archive.append(request, record)
        return record, usable

    def _settled(self, request: ChatRequest, result: ChatResult, batch: bool = False) -> tuple[ChatResult, bool]:
        """Account a billed response (at the worst case if it says nothing of its usage); the
        record to archive and return, and whether it is usable."""
        if not result.usage:
            result = replace(result, usage=request.worst_case_usage(), usage_estimated=True)
        self.account(result, batch)
        if result.finish_reason in self.settings.retry_finish_reasons:
            self.counts[f"retry_finish_{result.finish_reason}"] += 1
            return self._outbound(replace(result, status="retry")), False  # billed, so kept for audit
        self.counts["sent_ok"] += 1
        return self._outbound(result), True

    async def _archive(self, request: ChatRequest, result: ChatResult) -> None:
        """Archive a response before it is used, through one writer in a thread: the responses that
        arrive while it writes go together in its next write, with one fsync. Appending each on
        the event loop blocked it for an fsync per response (7 ms on a shared disk: a quarter of
        the loop at 35 responses a second)."""
        written = asyncio.get_running_loop().create_future()
        self._unwritten.append((request, result, written))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.ensure_future(self._write_archive())
        await written

    async def _write_archive(self) -> None:
        while self._unwritten:
            group, self._unwritten = self._unwritten, []
            try:
                await asyncio.to_thread(self.archive.append_many, [(request, result) for request, result, _ in group])
            except Exception as err:  # each waiting request fails as the append would have
                for *_, written in group:
                    if not written.done():  # (an asker cancelled meanwhile)
                        written.set_exception(err)
            else:
                for *_, written in group:
                    if not written.done():
                        written.set_result(None)

    def record_failure(self, request: ChatRequest, kind: str, error: str, attempts: int, started: float) -> ChatResult:
        failed = self._outbound(
            ChatResult(
                key=request.key,
                status="failed",
                error=f"{kind}: {error}",
                attempts=attempts,
                started=started,
                finished=time.time(),
            )
        )
        self.archive.append(request, failed)
        self.counts["failed"] += 1
        self.counts[f"failed_{kind}"] += 1
        log.warning("%s failed after %d attempt(s): %s", request.describe(), attempts, kind)
        return failed

    def backoff(self, attempt: int, retry_after: float | None) -> float:
        """Jittered exponential backoff, or the server's Retry-After when longer; never more than
        `llm.backoff_max_s`, whatever the server asks."""
        cap = self.settings.backoff_max_s
        base = min(cap, self.settings.backoff_base_s * 2 ** (attempt - 1))
        delay = random.uniform(0.5 * base, base)  # jitter spreads retries from many requests
        return min(cap, max(delay, retry_after or 0.0))


def _seen(counts: Counter, prefix: str) -> set[str]:
    return {k[len(prefix) :] for k in counts if k.startswith(prefix)}


def _from_the_wire(err: BaseException | None) -> BaseException | None:
    """The SDK, HTTP or reply error in `err`'s chain, if any."""
    import openai

    while err is not None:
        if isinstance(err, openai.OpenAIError | httpx2.HTTPError | ReplyRefused):
            return err
        err = err.__cause__ or err.__context__
    return None
