"""Backends that send one ChatRequest: OpenAI(-compatible), Azure OpenAI, and archive replay.

All network backends use the openai SDK with its own retries switched off: retries, pacing
and accounting belong to the client, which sees every attempt. Error messages kept from a
response are stripped of the API key (a misconfigured proxy may echo it back); the client
logs only their kind, never their text, because a server may also echo the note.
"""

from __future__ import annotations

import json
import os
import time

from asclepius_r.errors import UserError
from asclepius_r.llm.archive import ChatRequest, ChatResult
from asclepius_r.llm.guard import base_url, guarded_http_client, refusal


class ReplayMissError(UserError, LookupError):
    """`backend: replay` met a request that the archive does not hold."""


class RetryableError(Exception):
    """A failure worth another attempt; `retry_after` is the server's hint in seconds."""

    def __init__(self, kind: str, message: str, retry_after: float | None = None, headers: dict | None = None):
        super().__init__(message)
        self.kind = kind
        self.retry_after = retry_after
        self.headers = headers or {}


class FatalError(Exception):
    """A failure that another attempt of the same request cannot fix (e.g. HTTP 400)."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def read_api_key(settings) -> str:
    """The API key, from the environment variable named by `llm.api_key_env` and nowhere else."""
    key = os.environ.get(settings.api_key_env)
    if not key:
        raise FatalError(
            "config",
            f"environment variable {settings.api_key_env} (named by llm.api_key_env) is "
            "not set; API keys are read only from the environment, never from config files",
        )
    return key


def result_from_payload(request: ChatRequest, payload, provider: dict, started: float) -> ChatResult:
    """A ChatResult from a chat.completion JSON object (online or from a batch output line)."""
    choices = payload.get("choices") if isinstance(payload, dict) else None
    if not choices or not isinstance(choices[0], dict):
        raise RetryableError("malformed", "response without choices")
    choice = choices[0]
    finish_reason = choice.get("finish_reason")
    text = (choice.get("message") or {}).get("content")
    if text is None and finish_reason != "content_filter":
        raise RetryableError("malformed", "response without message content")
    usage = payload.get("usage") or {}
    return ChatResult(
        key=request.key,
        status="ok",
        text=text,
        finish_reason=finish_reason,
        usage={k: usage[k] for k in ("prompt_tokens", "completion_tokens", "total_tokens") if k in usage},
        provider={
            **provider,
            "model": payload.get("model"),
            "id": payload.get("id"),
            "system_fingerprint": payload.get("system_fingerprint"),
        },
        started=started,
        finished=time.time(),
    )


class OpenAIBackend:
    """OpenAI or any OpenAI-compatible server (vLLM, llama.cpp, ...) at `base_url`."""

    batch_endpoint = "/v1/chat/completions"

    def __init__(self, settings):
        import openai

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

    def redact(self, text: str) -> str:
        return text.replace(self.secret, "[API key]") if self.secret else text

    async def send(self, request: ChatRequest) -> tuple[ChatResult, dict]:
        openai = self.openai
        started = time.time()
        try:
            raw = await self.client.chat.completions.with_raw_response.create(**self.body(request))
            headers = {k.lower(): v for k, v in raw.headers.items()}
            payload = json.loads(raw.content)
        except openai.RateLimitError as err:
            raise RetryableError(
                "rate_limited", self._describe(err), retry_after(err.response.headers), dict(err.response.headers)
            ) from None
        except openai.APITimeoutError:
            raise RetryableError("timeout", f"no answer within llm.timeout_s = {self.settings.timeout_s} s") from None
        except openai.APIConnectionError as err:
            if refusal(err):
                raise refusal(err) from None
            raise RetryableError("connection", type(err.__cause__ or err).__name__) from None
        except openai.InternalServerError as err:
            raise RetryableError("server_error", self._describe(err), retry_after(err.response.headers)) from None
        except openai.APIStatusError as err:
            if err.status_code in (408, 409):
                raise RetryableError(f"http_{err.status_code}", self._describe(err)) from None
            if getattr(err, "code", None) == "content_filter":  # Azure filtered the prompt itself
                raise FatalError("content_filter_prompt", self._describe(err)) from None
            raise FatalError(f"http_{err.status_code}", self._describe(err)) from None
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise RetryableError(
                "malformed", f"response body is not JSON ({err.msg if hasattr(err, 'msg') else err})"
            ) from None
        return result_from_payload(request, payload, self.provider(), started), headers

    def _describe(self, err) -> str:
        return self.redact(f"HTTP {err.status_code}: {err.message}")[:500]


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

    def redact(self, text: str) -> str:
        return text

    async def send(self, request: ChatRequest):
        raise ReplayMissError(
            f"llm.backend is 'replay' but {request.describe()} is not in the archive "
            f"{self.settings.archive}; the prompts, seed questions or notes changed since it was recorded "
            "(rebuild the demo archive with `python -m support.demo_archive`, or use a live backend)"
        )


def retry_after(headers) -> float | None:
    """The server's Retry-After hint in seconds (`retry-after-ms` or `retry-after`)."""
    for name in ("retry-after-ms", "retry-after"):
        value = headers.get(name) if headers else None
        if value:
            try:
                seconds = float(value)
            except ValueError:
                continue
            return seconds / 1000 if name.endswith("-ms") else seconds
    return None


BACKENDS = {"openai": OpenAIBackend, "azure": AzureBackend, "replay": ReplayBackend}


def make_backend(settings):
    return BACKENDS[settings.backend](settings)
