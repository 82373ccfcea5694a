"""The PHI guard: notes go only to endpoints the user has declared approved.

PhysioNet's credentialed-data rules (24 Sep 2025) allow sending MIMIC notes only to a service
that retains no data, does not train on it and has no human review (such as an Azure OpenAI
deployment with abuse monitoring opted out), or to a locally deployed model. The workflow
cannot verify that contract, so the user states it by listing the endpoint.

The check is on where bytes actually go, not only on the config: the HTTP client under the
openai SDK is built here, with the base URL always explicit, no redirects followed, no proxy
from the environment (only `llm.proxy`), and a hook that refuses any request outside the
approved endpoint before it is sent. Environment variables through which the SDK would pick
another endpoint are refused. Every backend that talks to a server gets its client here.

What comes back is bounded too: a reply or error body is read up to `REPLY_MAX_BYTES` after
decompression (a gzip bomb stops there), decompressed here in pieces of `DECODE_CHUNK_BYTES`;
batch result files, which grow with the batch, are read as a stream (batch.py bounds each line).
"""

from __future__ import annotations

import logging
import os
import zlib
from urllib.parse import urlsplit

import httpx2

from asclepius_r.errors import UserError
from asclepius_r.llm.redact import ReplyRefused, redact_urls

log = logging.getLogger(__name__)

OPENAI_DEFAULT_BASE_URL = "https://api.openai.com/v1"
# Read by the openai SDK when an argument is missing; each would change where requests go or
# what they carry, so a value that the config does not also say is refused.
SDK_ENDPOINT_VARIABLES = ("OPENAI_BASE_URL", "OPENAI_API_BASE", "AZURE_OPENAI_ENDPOINT", "OPENAI_CUSTOM_HEADERS")
# Read by the SDK only when no argument is given; the workflow always gives one.
SDK_IGNORED_VARIABLES = ("OPENAI_API_KEY", "AZURE_OPENAI_API_KEY", "AZURE_OPENAI_AD_TOKEN", "OPENAI_API_VERSION")
# Honoured by HTTP clients that trust the environment; ours does not (see `llm.proxy`).
PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy")
# A chat completion of 4,096 tokens is about 20 KB; this leaves room for any honest reply.
REPLY_MAX_BYTES = 4 * 2**20
DECODE_CHUNK_BYTES = 2**16
# What this client can decode within those bounds; a reply in another encoding is refused.
# (zlib's window bits + 32: gzip or zlib framing, from the header)
DECODABLE = {"identity": None, **dict.fromkeys(("gzip", "x-gzip", "deflate"), zlib.MAX_WBITS | 32)}


class UnapprovedEndpointError(UserError, PermissionError):
    """The endpoint is not listed in `llm.approved_endpoints`."""


def endpoint_identity(settings) -> str:
    """The string a user lists in `llm.approved_endpoints` to approve this backend."""
    if settings.backend == "azure":
        return f"{settings.azure_endpoint.rstrip('/')}/openai/deployments/{settings.azure_deployment}"
    return base_url(settings)


def base_url(settings) -> str:
    """The base URL the SDK client is built with: always explicit, never the SDK's own default."""
    if settings.backend == "azure":
        return settings.azure_endpoint.rstrip("/")
    return (settings.base_url or OPENAI_DEFAULT_BASE_URL).rstrip("/")


def request_prefix(settings) -> str:
    """Every request URL starts with this: the chat path, and for batches the files and batches
    paths (on Azure those belong to the resource, not to the deployment)."""
    return base_url(settings) + ("/openai/" if settings.backend == "azure" else "/")


def _approval_message(identity: str, what: str) -> str:
    identity = redact_urls(identity)  # as the user wrote it, less any credentials in it
    return (
        f"refusing to send notes to {what}{identity!r}: it is not listed in llm.approved_endpoints.\n"
        "MIMIC notes are credentialed data. PhysioNet's rules allow an LLM service only if it keeps\n"
        "no data (zero retention), does not train on it and has no human review (for Azure OpenAI:\n"
        "abuse monitoring / human review opted out), or a model deployed locally.\n"
        f"Once you have confirmed that for this endpoint, add it to the config:\n"
        f"  llm:\n    approved_endpoints:\n      - {identity}"
    )


def check_environment(settings) -> None:
    """Refuse SDK variables that would send requests elsewhere than the config says.

    Values are never quoted: a URL in the environment may carry credentials.
    """
    configured = base_url(settings)
    for name in SDK_ENDPOINT_VARIABLES:
        value = os.environ.get(name)
        if value and (name == "OPENAI_CUSTOM_HEADERS" or value.rstrip("/") != configured):
            raise UnapprovedEndpointError(
                f"environment variable {name} is set and would make the openai SDK send requests elsewhere "
                f"than the config says ({configured}). The workflow sends notes only where the config's "
                "llm.base_url / llm.azure_endpoint point: unset it, or put that endpoint in the config "
                "(and in llm.approved_endpoints)."
            )


def _say_what_is_ignored(settings) -> None:
    """Variables the SDK or HTTP clients would read, which this client does not: said once per client."""
    unused = [n for n in SDK_IGNORED_VARIABLES if os.environ.get(n) and n != settings.api_key_env]
    if unused:
        log.info(
            "%s set in the environment: not used; the key comes only from the variable llm.api_key_env names (%s) "
            "and the API version only from llm.api_version.",
            ", ".join(unused),
            settings.api_key_env,
        )
    ignored = [name for name in PROXY_VARIABLES if os.environ.get(name)]
    if ignored:
        log.warning(
            "%s set in the environment: ignored. Notes go %s.",
            ", ".join(ignored),
            "through the proxy that llm.proxy names"
            if settings.proxy
            else "to the endpoint directly (llm.proxy is not set)",
        )


def check_endpoint(settings) -> None:
    """Raise before the first request if notes would go to an endpoint not listed as approved."""
    if settings.backend == "replay":
        return
    approved = [e.rstrip("/") for e in settings.approved_endpoints]
    identity = endpoint_identity(settings)
    if identity not in approved:
        raise UnapprovedEndpointError(_approval_message(identity, ""))
    # Through a proxy, a plain-http request (the note included) is readable by the proxy itself;
    # an https request is tunnelled and the proxy sees only the host name.
    if settings.proxy and urlsplit(base_url(settings)).scheme == "http" and settings.proxy.rstrip("/") not in approved:
        raise UnapprovedEndpointError(_approval_message(settings.proxy.rstrip("/"), "the proxy (llm.proxy) of "))
    check_environment(settings)


def guarded_http_client(settings, **options):
    """The SDK's HTTP client: nothing from the environment, no redirects, requests only under
    the approved endpoint (a request elsewhere raises UnapprovedEndpointError unsent)."""
    check_endpoint(settings)
    _say_what_is_ignored(settings)
    prefix = request_prefix(settings)

    async def only_approved(request) -> None:
        url = request.url
        if not str(url).startswith(prefix):
            port = f":{url.port}" if url.port else ""  # the URL's user and query are not quoted: they may hold secrets
            raise UnapprovedEndpointError(
                f"refusing a request to {url.scheme}://{url.host}{port}{url.path}: it is outside the approved "
                f"endpoint {endpoint_identity(settings)}"
            )

    async def bounded(response) -> None:
        # Batch result files are streamed and bounded line by line (batch.py); every other body here.
        limit = None if response.request.url.path.endswith("/content") else REPLY_MAX_BYTES
        encoding = response.headers.get("content-encoding", "identity").strip().lower()
        if encoding not in DECODABLE:
            raise ReplyRefused("a reply in a content-encoding this client does not decode")
        response.stream = BoundedBody(response.stream, DECODABLE[encoding], limit)
        response.headers.pop("content-encoding", None)  # decoded here, within the bound

    return httpx2.AsyncClient(
        trust_env=False,
        follow_redirects=False,
        proxy=settings.proxy or None,
        headers={"Accept-Encoding": "gzip"},
        event_hooks={"request": [only_approved], "response": [bounded]},
        **options,
    )


class BoundedBody(httpx2.AsyncByteStream):
    """A response stream decoded here, in pieces of at most DECODE_CHUNK_BYTES, that raises
    ReplyRefused once more than `limit` bytes (None: no limit) have come out of it."""

    def __init__(self, stream, wbits: int | None, limit: int | None):
        self.stream, self.wbits, self.limit = stream, wbits, limit

    async def __aiter__(self):
        inflate = zlib.decompressobj(self.wbits) if self.wbits is not None else None
        size = 0
        async for raw in self.stream:
            for piece in [raw] if inflate is None else _inflate(inflate, raw):
                size += len(piece)
                if self.limit is not None and size > self.limit:
                    raise ReplyRefused(f"a reply body over {self.limit:,} bytes")
                yield piece

    async def aclose(self) -> None:
        await self.stream.aclose()


def _inflate(inflate, data: bytes):
    """Decompress `data` in bounded pieces (a small input may inflate a thousandfold)."""
    try:
        piece = inflate.decompress(data, DECODE_CHUNK_BYTES)
        while piece:
            yield piece
            piece = inflate.decompress(inflate.unconsumed_tail, DECODE_CHUNK_BYTES)
    except zlib.error:
        raise ReplyRefused("a reply body that does not decompress") from None


def refusal(err: BaseException) -> UnapprovedEndpointError | None:
    """The guard's refusal behind an SDK connection error, if that is what stopped the request."""
    while err is not None:
        if isinstance(err, UnapprovedEndpointError):
            return err
        err = err.__cause__ or err.__context__
    return None
