"""Whatever a server sends back is an answer or a counted malformed reply, never a crash or a hang:
odd JSON shapes, bodies past the size bound (a gzip bomb included), encodings the client does not
decode, and waits a server asks for that are longer than the cap."""

from __future__ import annotations

import gzip
import json
import time
import tracemalloc
import zlib

import pytest

from asclepius_r.llm import LLMClient
from asclepius_r.llm.guard import REPLY_MAX_BYTES
from tests.llm_fixtures import live_settings, requests, server  # noqa: F401 (fixture)


def _choice(reply: dict, **changes) -> dict:
    return {**reply, "choices": [{**reply["choices"][0], **changes}]}


def _message(reply: dict, content) -> dict:
    return _choice(reply, message={"role": "assistant", "content": content})


def gzip_bomb(inflated_bytes: int) -> bytes:
    """A gzip stream of `inflated_bytes` of JSON-ish text, about a thousand times smaller."""
    packer = zlib.compressobj(9, zlib.DEFLATED, zlib.MAX_WBITS | 16)
    chunk = b" " * 2**20
    return (
        packer.compress(b'{"choices": "')
        + b"".join(packer.compress(chunk) for _ in range(inflated_bytes // len(chunk)))
        + packer.flush()
    )


MALFORMED = {
    "nested past the parser's depth": b"[" * 200_000 + b"]" * 200_000,
    "a JSON list": b"[1, 2, 3]",
    "a JSON string": b'"The discharge summary documents nothing."',
    "null": b"null",
    "an integer too long to read": b'{"choices": ' + b"9" * 10_000 + b"}",
    "not UTF-8": b'{"choices": "\xff\xfe"}',
    "empty": b"",
    "choices as an object": lambda reply: {**reply, "choices": reply["choices"][0]},
    "choices empty": lambda reply: {**reply, "choices": []},
    "a choice that is a string": lambda reply: {**reply, "choices": ["The summary documents a finding."]},
    "message as a string": lambda reply: _choice(reply, message="The summary documents a finding."),
    "usage as a string": lambda reply: {**reply, "usage": "12 tokens"},
    "content a number": lambda reply: _message(reply, 42),
    "content a list of parts": lambda reply: _message(reply, [{"type": "text", "text": "a finding"}]),
    "content an object": lambda reply: _message(reply, {"text": "a finding"}),
    "no content": lambda reply: _message(reply, None),
    "finish_reason an object": lambda reply: _choice(reply, finish_reason={"reason": "stop"}),
    "finish_reason a sentence": lambda reply: _choice(reply, finish_reason="stopped because of the note"),
}


@pytest.mark.parametrize("body", MALFORMED.values(), ids=MALFORMED.keys())
def test_every_odd_reply_is_a_counted_malformed_failure(server, tmp_path, body):
    server.add_fault("reply", times=None, body=body, match="synthetic note 1:")
    client = LLMClient(live_settings(server, tmp_path / "a.jsonl", max_attempts=2))
    results = client.run(requests(3))
    assert [r.status for r in results] == ["ok", "failed", "ok"]
    assert results[1].error.startswith("malformed") and client.stats["retries"]["malformed"] == 2
    assert client.stats["failures"]["malformed"] == 1


def test_metadata_that_is_not_a_name_is_dropped_and_the_answer_kept(server, tmp_path):
    odd = {"id": {"nested": 1}, "model": ["a", "list"], "system_fingerprint": "has spaces in it"}
    server.add_fault("reply", times=None, body=lambda reply: {**reply, **odd})
    results = LLMClient(live_settings(server, tmp_path / "a.jsonl")).run(requests(2))
    assert all(r.ok and r.text.startswith("The discharge summary") for r in results)
    assert [{k: r.provider[k] for k in odd} for r in results] == [dict.fromkeys(odd)] * 2


def test_a_gzip_bomb_is_inflated_only_up_to_the_bound(server, tmp_path):
    bomb = gzip_bomb(256 * 2**20)  # 256 MiB inflated
    assert len(bomb) < 2**20
    server.add_fault("reply", times=None, body=bomb, headers={"Content-Encoding": "gzip"})
    client = LLMClient(live_settings(server, tmp_path / "a.jsonl", max_attempts=2))
    tracemalloc.start()
    try:
        results = client.run(requests(1))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert results[0].status == "failed" and client.stats["retries"]["malformed"] == 2
    assert peak < 4 * REPLY_MAX_BYTES, f"{peak / 2**20:.0f} MiB held for a reply bounded at 4 MiB"


def test_a_gzipped_reply_within_the_bound_is_an_answer(server, tmp_path):
    server.add_fault(
        "reply",
        times=None,
        body=lambda reply: gzip.compress(json.dumps(reply).encode()),
        headers={"Content-Encoding": "gzip"},
    )
    assert all(r.ok for r in LLMClient(live_settings(server, tmp_path / "a.jsonl")).run(requests(2)))


@pytest.mark.parametrize(
    "body, headers",
    [
        (b'{"choices": "' + b" " * (REPLY_MAX_BYTES + 10) + b'"}', {}),
        (b"\x1b\x00\x00\x00 not brotli", {"Content-Encoding": "br"}),
        (b"not gzip at all", {"Content-Encoding": "gzip"}),
    ],
    ids=["plain, past the bound", "an encoding not decoded here", "gzip that is not"],
)
def test_bodies_past_the_bound_or_in_other_encodings_are_malformed(server, tmp_path, body, headers):
    server.add_fault("reply", times=None, body=body, headers=headers)
    client = LLMClient(live_settings(server, tmp_path / "a.jsonl", max_attempts=2))
    assert client.run(requests(1))[0].status == "failed" and client.stats["failures"]["malformed"] == 1


@pytest.mark.parametrize(
    "headers",
    [
        {"retry-after": "31536000"},
        {"retry-after-ms": "1e15"},
        {"retry-after": "inf"},
        {"retry-after": "nan"},
        {"retry-after": "-5"},
        {"x-ratelimit-reset-requests": "8760h"},
        {"x-ratelimit-reset-tokens": "1e999s"},
    ],
    ids=lambda headers: "=".join(*headers.items()),
)
def test_a_server_cannot_make_the_client_wait_past_the_cap(server, tmp_path, headers):
    server.add_fault("rate_limit", times=1, retry_after=None, headers=headers)
    client = LLMClient(live_settings(server, tmp_path / "a.jsonl", backoff_max_s=0.5))
    started = time.monotonic()
    assert client.run(requests(1))[0].ok
    first, retry = server.chat_requests()
    assert retry.received - first.answered <= 0.5 + 0.5, "waited past llm.backoff_max_s"
    assert time.monotonic() - started < 30
