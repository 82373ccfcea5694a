"""The archive: a torn last line is ignored and cut off by the next append, other damage names
the line, concurrent writers from several processes never interleave records, and its compact
index holds every key and never answers one key with another's record."""

from __future__ import annotations

import json
import multiprocessing
from types import SimpleNamespace

import pytest

from asclepius_r.llm import Archive, ChatRequest, ChatResult
from asclepius_r.llm.digest_index import DigestIndex


def request(i: int) -> ChatRequest:
    return ChatRequest(model="m", messages=(("user", f"synthetic prompt {i}"),), meta={"row_id": i})


def ok(req: ChatRequest) -> ChatResult:
    return ChatResult(key=req.key, status="ok", text=f"answer to {req.key[:6]}", finish_reason="stop")


def test_torn_last_line_is_ignored_then_cut_off_by_the_next_append(tmp_path):
    path = tmp_path / "archive.jsonl"
    archive = Archive(path)
    for i in range(2):
        archive.append(request(i), ok(request(i)))
    whole = path.read_bytes()
    path.write_bytes(whole + whole.splitlines(keepends=True)[0][:37])  # a writer killed mid-line

    reloaded = Archive(path)
    assert len(reloaded) == 2 and reloaded.get(request(1)).text == ok(request(1)).text
    reloaded.append(request(2), ok(request(2)))
    lines = path.read_bytes().splitlines(keepends=True)
    assert len(lines) == 3 and all(line.endswith(b"\n") for line in lines)
    assert [json.loads(line)["meta"]["row_id"] for line in lines] == [0, 1, 2]


def test_damage_before_the_last_line_is_an_error_naming_the_line(tmp_path):
    path = tmp_path / "archive.jsonl"
    archive = Archive(path)
    for i in range(3):
        archive.append(request(i), ok(request(i)))
    lines = path.read_text().splitlines(keepends=True)
    path.write_text(lines[0] + "{not json\n" + lines[2])
    with pytest.raises(ValueError, match=r"archive.jsonl:2: not valid JSON"):
        Archive(path)


def test_failed_records_are_reused_only_when_asked_and_retry_records_never(tmp_path):
    path = tmp_path / "archive.jsonl"
    archive = Archive(path)
    billed = ChatResult(key=request(0).key, status="retry", text="cut sh", finish_reason="length")
    archive.append(request(0), billed)
    archive.append(request(1), ChatResult(key=request(1).key, status="failed", error="timeout: no answer"))
    reloaded = Archive(path)
    assert reloaded.get(request(0), include_failed=True) is None and reloaded.billed_retries == 1
    assert reloaded.get(request(1)) is None and reloaded.get(request(1), include_failed=True).status == "failed"


def _append_many(path: str, offset: int) -> None:
    archive = Archive(path)
    for i in range(offset, offset + 40):
        archive.append(request(i), ok(request(i)))


def test_concurrent_writers_in_several_processes_keep_every_record_whole(tmp_path):
    path = tmp_path / "archive.jsonl"
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_append_many, args=(str(path), 1000 * w)) for w in range(3)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert [w.exitcode for w in workers] == [0, 0, 0]
    assert len(Archive(path)) == 120


def test_the_index_holds_every_key_through_its_growth_and_the_last_record_wins(tmp_path):
    path = tmp_path / "archive.jsonl"
    archive = Archive(path)
    archive.append_many([(request(i), ok(request(i))) for i in range(3000)])  # the index doubles 3 times
    archive.append(request(7), ChatResult(key=request(7).key, status="failed", error="timeout: no answer"))
    for store in (archive, Archive(path)):
        assert len(store) == 3000 and store.answered() == 2999
        assert all(store.get(request(i)).text == ok(request(i)).text for i in range(3000) if i != 7)
        assert store.get(request(7)) is None and store.get(request(7), include_failed=True).status == "failed"
        assert store.get(request(3000)) is None
        assert [key for key, _ in store.results()][:3] == [request(i).key for i in range(3)]  # the file's order


def test_two_keys_sharing_the_index_slot_never_answer_for_each_other(tmp_path):
    """The index keys its slots by a digest's first 8 bytes; a key that shares them with an archived
    one (one chance in 10^10 at a million keys) is a miss, never the other's answer."""
    archived = request(1)
    twin = (bytes.fromhex(archived.key)[:8] + bytes(24)).hex()
    index = DigestIndex()
    index[bytes.fromhex(archived.key)] = 5
    assert index.get(bytes.fromhex(twin)) == 5 and len(index) == 1
    archive = Archive(tmp_path / "archive.jsonl")
    archive.append(archived, ok(archived))
    assert archive.get(SimpleNamespace(key=twin)) is None  # get reads only the request's key
    assert archive.get(archived).text == ok(archived).text
