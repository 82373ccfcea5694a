"""Backends that send one ChatRequest: OpenAI(-compatible), Azure OpenAI, and archive replay.

All network backends use the openai SDK with its own retries switched off: retries, pacing
and accounting belong to the client, which sees every attempt. A reply is checked field by
field (`parse_reply`): whatever a server sends is either an answer or a malformed reply, which
is retried. Errors are described by their kind, HTTP status and the server's error type and
code (redact.describe_error), never by a server's text, which may echo the request: the key
from its header, the note from its body.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import re
import time

import httpx2

from asclepius_r.config import ConfigError
from asclepius_r.errors import UserError
from asclepius_r.llm.archive import ChatRequest, ChatResult
from asclepius_r.llm.guard import base_url, guarded_http_client, refusal
from asclepius_r.llm.redact import ReplyRefused, describe_error, is_name

# A finish reason is a short lower-case name ("stop", "length", "content_filter", ...).
FINISH_REASON = re.compile(r"[a-z_]{1,32}")


class ReplayMissError(UserError, LookupError):
    """`backend: replay` met a request that the archive does not hold."""


class ProviderError(UserError, RuntimeError):
    """The LLM service failed in a way the client's retries did not fix. The message says how
    (redact.describe_error), never what the service sent back."""


class RetryableError(Exception):
    """A failure worth another attempt; `retry_after` is the server's hint in seconds.

    `billed`: the provider may have billed the attempt (a reply that came back unusable, or one
    the client stopped waiting for); the client then charges `usage` (what the reply reported,
    if usable) or the request's worst case."""

    def __init__(
        self,
        kind: str,
        message: str,
        retry_after: float | None = None,
        headers: dict | None = None,
        billed: bool = False,
        usage: dict | None = None,
    ):
        super().__init__(message)
        self.kind = kind
        self.retry_after = retry_after
        self.headers = headers or {}
        self.billed = billed
        self.usage = usage


class MalformedReply(RetryableError):
    """A reply that came back (and may be billed) but is not a usable answer."""

    def __init__(self, reason: str, usage: dict | None = None):
        super().__init__("malformed", reason, billed=True, usage=usage)


class FatalError(Exception):
    """A failure that another attempt of the same request cannot fix (e.g. HTTP 400)."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def read_api_key(settings) -> str:
    """The API key, from the environment variable named by `llm.api_key_env` and nowhere else."""
    key = os.environ.get(settings.api_key_env)
    if not key:
        raise ConfigError(
            f"environment variable {settings.api_key_env} (named by llm.api_key_env) is "
            "not set; API keys are read only from the environment, never from config files"
        )
    return key


def parse_json(body: bytes):
    """A reply body as JSON; anything that does not parse (deep nesting included) is malformed."""
    try:
        return json.loads(body)
    except (ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise MalformedReply("the reply is not JSON") from None


def checked_usage(usage, request: ChatRequest) -> dict[str, int] | None:
    """The reply's usage as prompt and completion token counts; None when it reports none (then
    the client charges the worst case). Counts that are not whole numbers, are negative or exceed
    what the request can use (`ChatRequest.worst_case_usage`) make the reply malformed."""
    if usage is None or usage == {}:
        return None
    if not isinstance(usage, dict):
        raise MalformedReply("usage is not an object")
    counts = {name: usage.get(name) for name in ("prompt_tokens", "completion_tokens")}
    if None in counts.values():
        return None
    bound = request.worst_case_usage()
    for name, value in counts.items():
        if type(value) is not int or not 0 <= value <= bound[name]:
            raise MalformedReply(f"usage.{name} is not a count this request can use")
    return counts


def parse_reply(request: ChatRequest, payload, provider: dict, started: float) -> ChatResult:
    """A ChatResult from a chat.completion object (online, or a batch output line's body), or
    MalformedReply saying which part is unusable (with the reply's usage, if that is usable)."""
    if not isinstance(payload, dict):
        raise MalformedReply("the reply is not a JSON object")
    usage = checked_usage(payload.get("usage"), request)
    choices = payload.get("choices")
    choice = choices[0] if isinstance(choices, list) and choices else None
    message = choice.get("message") if isinstance(choice, dict) else None
    if not isinstance(message, dict):
        raise MalformedReply("a reply without choices[0].message", usage)
    finish_reason, text = choice.get("finish_reason"), message.get("content")
    if finish_reason is not None and not (isinstance(finish_reason, str) and FINISH_REASON.fullmatch(finish_reason)):
        raise MalformedReply("finish_reason is not a name", usage)
    if text is None and finish_reason != "content_filter":
        raise MalformedReply("a reply without message content", usage)
    if text is not None and not isinstance(text, str):
        raise MalformedReply("message content is not text", usage)
    meta = {name: payload.get(name) for name in ("model", "id", "system_fingerprint")}
    return ChatResult(
        key=request.key,
        status="ok",
        text=text,
        finish_reason=finish_reason,
        usage=usage or request.worst_case_usage(),
        usage_estimated=usage is None,
        provider={**provider, **{name: value if is_name(value) else None for name, value in meta.items()}},
        started=started,
        finished=time.time(),
    )


def quiet_sdk_logs() -> None:
    """The SDK logs request options (the note) at DEBUG, its HTTP client every URL and the
    server's reason phrase at INFO, its transport the reason phrase and headers at DEBUG: warnings
    only, whatever OPENAI_LOG or the root logger say."""
    for name in ("openai", "httpx2", "httpcore2"):
        logging.getLogger(name).setLevel(logging.WARNING)


class OpenAIBackend:
    """OpenAI or any OpenAI-compatible server (vLLM, llama.cpp, ...) at `base_url`."""

    batch_endpoint = "/v1/chat/completions"

    def __init__(self, settings):
        import openai

        quiet_sdk_logs()
        self.settings = settings
        self.openai = openai
        self.secret = read_api_key(settings)
        self.client = self._make_client(openai, settings)

    def _make_client(self, openai, settings):
        return openai.AsyncOpenAI(
            base_url=base_url(settings),
            api_key=self.secret,
            max_retries=0,
            timeout=settings.timeout_s,
            http_client=self._http_client(openai, settings),
        )

    @staticmethod
    def _http_client(openai, settings):
        return guarded_http_client(settings, timeout=settings.timeout_s, limits=openai.DEFAULT_CONNECTION_LIMITS)

    def provider(self) -> dict:
        return {}

    def body(self, request: ChatRequest) -> dict:
        return {
            "model": request.model,
            "temperature": request.temperature,
            "max_tokens": request.max_tokens,
            "messages": [{"role": role, "content": content} for role, content in request.messages],
        }

    async def send(self, request: ChatRequest) -> tuple[ChatResult, dict]:
        """One attempt, within `llm.timeout_s` in all (the SDK's timeout is per read: a server
        that trickles bytes would hold it forever)."""
        openai = self.openai
        started = time.time()
        try:
            async with asyncio.timeout(self.settings.timeout_s):
                raw = await self.client.chat.completions.with_raw_response.create(**self.body(request))
        except (TimeoutError, openai.APITimeoutError):
            waited = f"no reply within llm.timeout_s = {self.settings.timeout_s} s"
            raise RetryableError("timeout", waited, billed=True) from None
        except ReplyRefused as err:
            raise MalformedReply(str(err)) from None
        except openai.APIConnectionError as err:
            if refusal(err):
                raise refusal(err) from None
            # Refused before the request went out, it cannot be billed; after, it may have been.
            unsent = isinstance(err.__cause__, httpx2.ConnectError)
            raise RetryableError("connection", describe_error(err), billed=not unsent) from None
        except openai.RateLimitError as err:
            headers = dict(err.response.headers)
            raise RetryableError("rate_limited", describe_error(err), retry_after(headers), headers) from None
        except openai.InternalServerError as err:
            raise RetryableError("server_error", describe_error(err), retry_after(err.response.headers)) from None
        except openai.APIStatusError as err:
            if err.status_code in (408, 409):
                raise RetryableError(f"http_{err.status_code}", describe_error(err)) from None
            if getattr(err, "code", None) == "content_filter":  # Azure filtered the prompt itself
                raise FatalError("content_filter_prompt", describe_error(err)) from None
            raise FatalError(f"http_{err.status_code}", describe_error(err)) from None
        headers = {k.lower(): v for k, v in raw.headers.items()}
        return parse_reply(request, parse_json(raw.content), self.provider(), started), headers


class AzureBackend(OpenAIBackend):
    """An Azure OpenAI deployment (`azure_endpoint`, `azure_deployment`, `api_version`)."""

    batch_endpoint = "/chat/completions"

    def _make_client(self, openai, settings):
        return openai.AsyncAzureOpenAI(
            azure_endpoint=base_url(settings),
            azure_deployment=settings.azure_deployment,
            api_version=settings.api_version,
            api_key=self.secret,
            max_retries=0,
            timeout=settings.timeout_s,
            http_client=self._http_client(openai, settings),
        )

    def provider(self) -> dict:
        return {"deployment": self.settings.azure_deployment, "api_version": self.settings.api_version}

    def body(self, request: ChatRequest) -> dict:
        # Azure batch lines name the (global batch) deployment where OpenAI names the model.
        return {**super().body(request), "model": self.settings.azure_deployment}


class ReplayBackend:
    """Never touches the network: every request must already be in the archive."""

    secret = None

    def __init__(self, settings):
        self.settings = settings

    async def send(self, request: ChatRequest):
        raise ReplayMissError(
            f"llm.backend is 'replay' but {request.describe()} is not in the archive "
            f"{self.settings.archive}; the prompts, seed questions or notes changed since it was recorded "
            "(rebuild the demo archive with `python -m support.demo_archive`, or use a live backend)"
        )


def retry_after(headers) -> float | None:
    """The server's Retry-After hint in seconds (`retry-after-ms` or `retry-after`); a value that
    is not a finite, non-negative number is no hint. The client caps it (llm.backoff_max_s)."""
    for name in ("retry-after-ms", "retry-after"):
        value = headers.get(name) if headers else None
        if value:
            try:
                seconds = float(value)
            except ValueError:
                continue
            if math.isfinite(seconds) and seconds >= 0:
                return seconds / 1000 if name.endswith("-ms") else seconds
    return None


BACKENDS = {"openai": OpenAIBackend, "azure": AzureBackend, "replay": ReplayBackend}


def make_backend(settings):
    return BACKENDS[settings.backend](settings)
