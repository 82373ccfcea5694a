"""What may leave the LLM client: secrets removed, and nothing of a server's own text.

A server, or a proxy in front of it, can put anything into any field of a reply or an error:
the API key from the request's Authorization header, the note from its body. So the client
keeps from the wire only what it can check the shape of (a reply's answer, usage as integers,
identifiers that are short names) and says of an error only its kind, the HTTP status and the
server's error type and code when those are short names, never the message.

`Redactor` is the one redaction function: the client passes every result it returns or
archives, and every error it raises, through it, removing the API key and the credentials
written into the configured URLs (a proxy's password, `?api-key=`), also in the base64 form of
HTTP Basic authentication. `redact_urls` removes credentials from any URL in a text, for copies
of the config (the release's) and messages that quote a configured URL.
"""

from __future__ import annotations

import base64
import re
from urllib.parse import unquote, urlsplit

REDACTED = "[redacted]"
# A URL in running text, up to the first character that cannot be part of one.
URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>`]+")
# An identifier, model name, error type or code a server sends: a short name, no spaces.
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/@+=-]{0,199}")
# Shorter values are not treated as secrets: replacing them would mangle ordinary text.
MIN_SECRET_CHARS = 6
# Query parameters that carry credentials (api-key, access_token, sig, ...); the values of others
# (api-version=2024-10-21) are not secrets to replace in an answer's text.
CREDENTIAL_PARAMETER = re.compile(r"key|token|sig|secret|pass|auth|cred|session|code", re.IGNORECASE)


def is_name(value) -> bool:
    return isinstance(value, str) and NAME.fullmatch(value) is not None


def redact_url(url: str) -> str:
    """The URL with its user information and every query value replaced."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        netloc = f"{REDACTED}@{netloc.rpartition('@')[2]}"
    query = "&".join(
        f"{name}={REDACTED}" if sep else name for name, sep, _ in (p.partition("=") for p in parts.query.split("&"))
    )
    rebuilt = f"{parts.scheme}://{netloc}{parts.path}"
    return rebuilt + (f"?{query}" if parts.query else "") + (f"#{parts.fragment}" if parts.fragment else "")


def redact_urls(text: str) -> str:
    """Every URL in `text` without its credentials (`redact_url`)."""
    return URL.sub(lambda match: redact_url(match.group(0)), text)


def redact_config(value):
    """A copy of a config (dicts, lists, strings) with every URL's credentials removed."""
    if isinstance(value, dict):
        return {key: redact_config(item) for key, item in value.items()}
    if isinstance(value, list):
        return [redact_config(item) for item in value]
    return redact_urls(value) if isinstance(value, str) else value


def url_secrets(url: str | None) -> list[str]:
    """The credentials a URL carries: its user information (as written, decoded and in HTTP Basic
    form) and the values of its credential parameters."""
    if not url:
        return []
    parts = urlsplit(url)
    found = []
    if "@" in parts.netloc:
        userinfo = parts.netloc.rpartition("@")[0]
        user, _, password = userinfo.partition(":")
        plain = f"{unquote(user)}:{unquote(password)}"
        found += [userinfo, password, unquote(password), base64.b64encode(plain.encode()).decode()]
    for name, sep, value in (p.partition("=") for p in parts.query.split("&")):
        if sep and CREDENTIAL_PARAMETER.search(name):
            found += [value, unquote(value)]
    return found


class Redactor:
    """Replaces each secret (the API key, URL credentials) wherever it appears, longest first."""

    def __init__(self, secrets: list[str | None]):
        kept = {s for s in secrets if s and len(s) >= MIN_SECRET_CHARS}
        self.secrets = sorted(kept, key=len, reverse=True)

    @classmethod
    def for_settings(cls, settings, api_key: str | None) -> Redactor:
        urls = [settings.proxy, settings.base_url, settings.azure_endpoint, *settings.approved_endpoints]
        return cls([api_key, *(secret for url in urls for secret in url_secrets(url))])

    def __call__(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, REDACTED)
        return text

    def value(self, value):
        """`value` with every string inside it (dict keys and values, list items) redacted."""
        if isinstance(value, str):
            return self(value)
        if isinstance(value, dict):
            return {self.value(key): self.value(item) for key, item in value.items()}
        if isinstance(value, list | tuple):
            return [self.value(item) for item in value]
        return value

    def contains_secret(self, text: str) -> bool:
        return any(secret in text for secret in self.secrets)


class ReplyRefused(Exception):
    """A reply the guard refused: a body past `guard.REPLY_MAX_BYTES`, or in an encoding this
    client does not decode. Its message is the client's own, so it is said as it is."""


def describe_error(err: BaseException) -> str:
    """What may be said of an error from the wire: the request's method and path, the HTTP status,
    the server's error type and code when they are short names, or the kind of connection
    failure. Never the error's message or body, which may echo the request."""
    import openai

    if isinstance(err, ReplyRefused):  # its message is the client's own
        return str(err)
    request = getattr(err, "request", None)
    where = f" ({request.method} {request.url.path})" if request is not None else ""
    if isinstance(err, openai.APIStatusError):
        details = [f"{name} {value}" for name in ("type", "code") if is_name(value := getattr(err, name, None))]
        return f"HTTP {err.status_code}{where}" + (f": {', '.join(details)}" if details else "")
    if isinstance(err, openai.APITimeoutError):
        return f"no answer in time{where}"
    if isinstance(err, openai.APIConnectionError):
        cause = err.__cause__ or err.__context__
        return f"connection failed{where}: {type(cause or err).__name__}"
    return type(err).__name__ + where
