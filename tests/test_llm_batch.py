"""Batch API mode against the local server's /v1/files and /v1/batches: same answers and archive
as online, faults retried in a further batch, half the price, provider files deleted, and a
crashed run's batch resumed instead of paid for again."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest

from asclepius_r.llm import Archive, LLMClient, ProviderError
from asclepius_r.llm.batch import BatchJournal
from tests.llm_fixtures import API_KEY, live_settings, requests, server  # noqa: F401 (fixture)


def _batches_created(server) -> int:
    return sum(1 for r in server.requests if r.method == "POST" and r.path == "/batches")


def test_batch_answers_equal_online_answers_at_half_the_price_and_share_the_archive(server, tmp_path, caplog):
    batch_archive = tmp_path / "batch.jsonl"
    with caplog.at_level(logging.WARNING):
        batch_client = LLMClient(live_settings(server, batch_archive, mode="batch"))
        batched = batch_client.run(requests(10))
    assert "stored on the provider's side" in caplog.text
    assert server.chat_requests() == [] and _batches_created(server) == 1
    assert all(r.ok and r.provider["batch"].startswith("batch_") for r in batched)
    assert server.files == {}  # input and output files deleted once collected

    online_client = LLMClient(live_settings(server, tmp_path / "online.jsonl"))
    online = online_client.run(requests(10))
    assert [r.text for r in batched] == [r.text for r in online]
    assert batch_client.cost_usd == pytest.approx(online_client.cost_usd * 0.5)

    reuse = LLMClient(live_settings(server, batch_archive))  # online mode, batch-made archive
    reuse.run(requests(10))
    assert reuse.stats["archived"] == 10 and len(server.chat_requests()) == 10


def test_unusable_batch_lines_go_into_a_further_batch_and_are_counted(server, tmp_path):
    server.add_fault("server_error", times=2)
    server.add_fault("length", times=1)
    server.add_fault("content_filter", times=1)
    client = LLMClient(live_settings(server, tmp_path / "a.jsonl", mode="batch"))
    results = client.run(requests(8))
    assert all(r.ok for r in results) and _batches_created(server) == 2
    retries = {k: v for k, v in client.stats["retries"].items() if v}
    assert retries == {"batch_error": 2, "finish_length": 1, "finish_content_filter": 1}
    assert max(server.delivered().values()) == 1 and len(server.delivered()) == 8


def test_batch_lines_failing_every_attempt_are_recorded_as_failed(server, tmp_path):
    server.add_fault("server_error", times=None, match="synthetic note 1:")
    client = LLMClient(live_settings(server, tmp_path / "a.jsonl", mode="batch", max_attempts=2))
    results = client.run(requests(3))
    assert [r.status for r in results] == ["ok", "failed", "ok"]
    assert client.stats["failures"]["batch_error"] == 1 and _batches_created(server) == 2


def test_a_crashed_run_resumes_its_batch_instead_of_submitting_again(server, tmp_path):
    archive = tmp_path / "a.jsonl"
    server.batch_delay_s = 1.0
    first = LLMClient(live_settings(server, archive, mode="batch"))

    async def crash_while_waiting():
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(first.run_async(requests(5)), timeout=0.3)

    asyncio.run(crash_while_waiting())
    assert _batches_created(server) == 1 and len(BatchJournal(archive).entries) == 1
    assert len(Archive(archive)) == 0

    resumed = LLMClient(live_settings(server, archive, mode="batch"))
    results = resumed.run(requests(5))
    assert all(r.ok for r in results) and _batches_created(server) == 1
    assert BatchJournal(archive).entries == {} and server.files == {}
    events = [json.loads(line)["event"] for line in (tmp_path / "a.jsonl.batches.jsonl").read_text().splitlines()]
    assert events == ["uploaded", "submitted", "collected", "cleaned"]


def test_azure_batch_lines_name_the_deployment(server, tmp_path):
    endpoint = f"{server.endpoint}/openai/deployments/gpt-4o-mini-batch"
    settings = live_settings(
        server,
        tmp_path / "a.jsonl",
        mode="batch",
        backend="azure",
        base_url=None,
        azure_endpoint=server.endpoint,
        azure_deployment="gpt-4o-mini-batch",
        api_version="2024-10-21",
        approved_endpoints=[endpoint],
        batch_delete_files=False,
    )
    assert all(r.ok for r in LLMClient(settings).run(requests(2)))
    uploads = [f["content"] for f in server.files.values() if f["info"]["purpose"] == "batch"]
    lines = [json.loads(line) for line in uploads[0].splitlines()]
    assert {(line["url"], line["body"]["model"]) for line in lines} == {("/chat/completions", "gpt-4o-mini-batch")}
    batch = next(iter(server.batches.values()))["public"]
    assert batch["endpoint"] == "/chat/completions"


def test_batch_input_files_go_when_the_batch_cannot_be_created_and_leftovers_next_run(server, tmp_path):
    archive = tmp_path / "a.jsonl"
    foreign = server._store_file(b"{}\n", "another-tool.jsonl", "batch")["id"]
    server.fail_route("POST", "/batches", times=None)
    with pytest.raises(ProviderError, match=r"HTTP 500 \(POST /v1/batches\)"):
        LLMClient(live_settings(server, archive, mode="batch", max_attempts=1)).run(requests(3))
    assert set(server.files) == {foreign}, "the notes stayed on the provider after batches.create failed"

    server.fail_route("DELETE", "/files/.*", times=None)  # and now the clean-up fails too: a leftover
    with pytest.raises(ProviderError):
        LLMClient(live_settings(server, archive, mode="batch", max_attempts=1)).run(requests(3))
    assert len(server.files) == 2
    server.fail_route("POST", "/batches", times=0)
    server.fail_route("DELETE", "/files/.*", times=0)
    assert all(r.ok for r in LLMClient(live_settings(server, archive, mode="batch")).run(requests(3)))
    assert set(server.files) == {foreign}, "an earlier run's input file was not found and removed"


def test_an_echoed_key_reaches_no_part_of_the_archive(server, tmp_path):
    # A proxy echoes the Authorization header; 430 characters before it would put a 500-character
    # cut inside the key, where redaction of the whole key would no longer find it.
    server.add_fault("http_error", times=None, status=400, echo_request=True, message="x" * 430)
    archive = tmp_path / "a.jsonl"
    results = LLMClient(live_settings(server, archive, mode="batch", max_attempts=1)).run(requests(2))
    assert all(r.status == "failed" and r.error.startswith("http_400") for r in results)
    text = archive.read_text()
    assert not [API_KEY[i : i + 8] for i in range(len(API_KEY) - 7) if API_KEY[i : i + 8] in text]


# -- what an earlier run left -------------------------------------------------------------------
class Killed(Exception):
    """Stands for a kill -9 at a chosen point."""


def _crash_while_its_batch_runs(server, archive, batch) -> None:
    first = LLMClient(live_settings(server, archive, mode="batch"))

    async def crash():
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(first.run_async(batch), timeout=0.3)

    asyncio.run(crash())
    assert _batches_created(server) == 1 and len(BatchJournal(archive).entries) == 1


def _nothing_left(server, archive) -> bool:
    return server.files == {} and BatchJournal(archive).entries == {}


def test_a_rerun_with_other_prompts_cancels_the_earlier_batch_and_keeps_what_it_answered(server, tmp_path):
    archive, original = tmp_path / "a.jsonl", requests(6)
    server.batch_delay_s = 6.0  # a line a second
    _crash_while_its_batch_runs(server, archive, original)
    server.wait_for(lambda s: sum(next(iter(s.batches.values()))["delivered"].values()) >= 2)

    other = LLMClient(live_settings(server, archive, mode="batch"))
    assert all(r.ok for r in other.run(requests(3, prefix="changed prompt")))
    earlier = next(iter(server.batches.values()))
    assert earlier["public"]["status"] == "cancelled" and _nothing_left(server, archive)
    answered = sum(earlier["delivered"].values())
    assert 0 < answered < 6 and len(Archive(archive)) == answered + 3  # its answers are archived

    again = LLMClient(live_settings(server, archive))  # online, asking the first prompts again
    assert all(r.ok for r in again.run(original)) and again.stats["archived"] == answered
    assert max(server.delivered().values()) == 1 and len(server.delivered()) == 9, "a request paid twice"


def test_an_online_rerun_finishes_the_crashed_runs_batch_and_sends_only_what_it_did_not_answer(server, tmp_path):
    archive, batch = tmp_path / "a.jsonl", requests(5)
    server.batch_delay_s = 1.5
    _crash_while_its_batch_runs(server, archive, batch)

    online = LLMClient(live_settings(server, archive))
    assert all(r.ok for r in online.run(batch))
    assert _nothing_left(server, archive) and _batches_created(server) == 1
    assert max(server.delivered().values()) == 1 and len(server.delivered()) == 5
    assert online.stats["archived"] + len(server.chat_requests()) == 5


def test_an_upload_whose_batch_was_never_journaled_is_found_and_collected(server, tmp_path, monkeypatch):
    archive, batch = tmp_path / "a.jsonl", requests(4)

    def killed(*args):
        raise Killed

    with monkeypatch.context() as patch:
        patch.setattr(BatchJournal, "submitted", killed)  # killed after batches.create, before the journal
        with pytest.raises(Killed):
            LLMClient(live_settings(server, archive, mode="batch")).run(batch)
    assert _batches_created(server) == 1 and "batch_id" not in next(iter(BatchJournal(archive).entries.values()))

    rerun = LLMClient(live_settings(server, archive, mode="batch"))
    assert all(r.ok for r in rerun.run(batch))
    assert _batches_created(server) == 1 and _nothing_left(server, archive)
    assert max(server.delivered().values()) == 1 and rerun.stats["usage"]["billed_responses"] == 4


def test_a_batch_collected_twice_is_paid_once_and_its_files_go_at_the_next_run(server, tmp_path, monkeypatch):
    archive, batch = tmp_path / "a.jsonl", requests(4)

    def killed(*args):
        raise Killed

    with monkeypatch.context() as patch:
        patch.setattr(BatchJournal, "collected", killed)  # killed after archiving, before the journal said so
        with pytest.raises(Killed):
            LLMClient(live_settings(server, archive, mode="batch")).run(batch)
    paid = sum(1 for line in archive.read_text().splitlines() if json.loads(line)["result"]["usage"])
    assert paid == 4 and server.files

    server.fail_route("DELETE", "/files/.*", times=None)  # and the next run cannot delete its files
    with pytest.raises(ProviderError, match="DELETE"):
        LLMClient(live_settings(server, archive, mode="batch", max_attempts=1)).run(batch)
    server.fail_route("DELETE", "/files/.*", times=0)

    rerun = LLMClient(live_settings(server, archive, mode="batch"))
    assert all(r.ok for r in rerun.run(batch)) and rerun.stats["archived"] == 4
    assert len(archive.read_text().splitlines()) == 4, "the lines archived before the kill were archived again"
    assert _batches_created(server) == 1 and _nothing_left(server, archive)
