"""Backends that send one ChatRequest: OpenAI(-compatible), Azure OpenAI, and archive replay.

All network backends use the openai SDK with its own retries switched off: retries, pacing
and accounting belong to the client, which sees every attempt.
"""

from __future__ import annotations

import json
import os
import time

from .archive import ChatRequest, ChatResult


class ReplayMissError(LookupError):
    pass


class RetryableError(Exception):
    """A failure worth another attempt; `retry_after` is the server's hint in seconds."""

    def __init__(self, kind: str, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.kind = kind
        self.retry_after = retry_after


class FatalError(Exception):
    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def _api_key(settings) -> str:
    key = os.environ.get(settings.api_key_env)
    if not key:
        raise FatalError("config", f"environment variable {settings.api_key_env} (llm.api_key_env) is not set")
    return key


class OpenAIBackend:
    """OpenAI or any OpenAI-compatible server (vLLM, llama.cpp, ...) at `base_url`."""

    def __init__(self, settings):
        import openai

        self.settings = settings
        self.openai = openai
        self.client = self._make_client(openai, settings)

    def _make_client(self, openai, settings):
        return openai.AsyncOpenAI(base_url=settings.base_url, api_key=_api_key(settings),
                                  max_retries=0, timeout=settings.timeout_s)

    def provider(self, response) -> dict:
        return {"model": response.model, "system_fingerprint": getattr(response, "system_fingerprint", None)}

    async def send(self, request: ChatRequest) -> tuple[ChatResult, dict]:
        openai = self.openai
        started = time.time()
        try:
            raw = await self.client.chat.completions.with_raw_response.create(
                model=request.model,
                messages=[{"role": role, "content": content} for role, content in request.messages],
                temperature=request.temperature,
                max_tokens=request.max_tokens,
            )
            headers = dict(raw.headers)
            response = raw.parse()
        except openai.RateLimitError as err:
            raise RetryableError("rate_limited", str(err), _retry_after(err.response.headers)) from None
        except openai.APITimeoutError as err:
            raise RetryableError("timeout", str(err)) from None
        except openai.APIConnectionError as err:
            raise RetryableError("connection", str(err)) from None
        except openai.InternalServerError as err:
            raise RetryableError("server_error", str(err), _retry_after(err.response.headers)) from None
        except openai.APIStatusError as err:
            if err.status_code in (408, 409):
                raise RetryableError(f"http_{err.status_code}", str(err)) from None
            raise FatalError(f"http_{err.status_code}", str(err)) from None
        except (json.JSONDecodeError, ValueError, TypeError) as err:
            raise RetryableError("malformed", f"malformed response: {err}") from None
        choices = getattr(response, "choices", None)
        if not choices or choices[0].message is None or choices[0].message.content is None:
            raise RetryableError("malformed", "response without a message")
        usage = response.usage.model_dump() if getattr(response, "usage", None) else {}
        result = ChatResult(key=request.key, status="ok", text=choices[0].message.content,
                            finish_reason=choices[0].finish_reason, usage=usage,
                            provider=self.provider(response), started=started, finished=time.time())
        return result, headers


class AzureBackend(OpenAIBackend):
    """An Azure OpenAI deployment (`azure_endpoint`, `azure_deployment`, `api_version`)."""

    def _make_client(self, openai, settings):
        return openai.AsyncAzureOpenAI(azure_endpoint=settings.azure_endpoint,
                                       azure_deployment=settings.azure_deployment,
                                       api_version=settings.api_version, api_key=_api_key(settings),
                                       max_retries=0, timeout=settings.timeout_s)

    def provider(self, response) -> dict:
        return {**super().provider(response), "deployment": self.settings.azure_deployment,
                "api_version": self.settings.api_version}


class ReplayBackend:
    """Never touches the network: every request must already be in the archive."""

    def __init__(self, settings):
        self.settings = settings

    async def send(self, request: ChatRequest):
        raise ReplayMissError(
            f"llm.backend is 'replay' but {request.describe()} is not in the archive "
            f"{self.settings.archive}; the prompts or notes changed since it was recorded "
            "(rebuild the demo archive with `python -m asclepius_r.demo.archive`, or use a live backend)"
        )


def _retry_after(headers) -> float | None:
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
