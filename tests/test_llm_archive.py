"""The archive: a torn last line is ignored and cut off by the next append, other damage (any
record this code did not write) is one line naming file and line, concurrent writers from several
processes never interleave records, and its compact index holds every key and never answers one
key with another's record."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess

import pytest

from asclepius_r.errors import InputError
from asclepius_r.llm import Archive, ChatRequest, ChatResult
from support.openai_server import OpenAIServer
from tests.llm_fixtures import API_KEY, KEY_ENV
from tests.test_instructions_engine import synthetic_notes, write_notes
from tests.test_instructions_kill import REPO, stage_command, write_config


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


def _result(**changes):
    return lambda record: {**record, "result": {**record["result"], **changes}}


DAMAGE = {
    "no result": lambda record: {k: v for k, v in record.items() if k != "result"},
    "a key that is not hex": lambda record: {**record, "key": "not-a-sha256-" + "z" * 51},
    "a JSON list": lambda record: [record],
    "a JSON number": lambda record: 7,
    "a line of NULs": b"\0" * 64,
    "cut in the middle": b'{"key": "ab',
    "an unknown status": _result(status="maybe"),
    "answer text that is a number": _result(text=5),
    "usage that is text": _result(usage="12 tokens"),
    "negative usage": _result(usage={"prompt_tokens": -1, "completion_tokens": 3}),
    "provider that is a list": _result(provider=["x"]),
    "no request model": lambda record: {**record, "request": {"messages": []}},
}


@pytest.mark.parametrize("damage", DAMAGE.values(), ids=DAMAGE.keys())
def test_a_damaged_record_is_one_line_naming_file_and_line(tmp_path, damage):
    path = tmp_path / "archive.jsonl"
    archive = Archive(path)
    for i in range(3):
        archive.append(request(i), ok(request(i)))
    lines = path.read_bytes().splitlines(keepends=True)
    lines[1] = (damage if isinstance(damage, bytes) else json.dumps(damage(json.loads(lines[1]))).encode()) + b"\n"
    path.write_bytes(b"".join(lines))
    with pytest.raises(InputError) as damaged:
        Archive(path)
    message = str(damaged.value)
    assert message.startswith(f"{path}:2: ") and "\n" not in message
    assert "synthetic prompt" not in message, "the record's content is not quoted"


def test_the_stage_reports_a_damaged_archive_in_one_log_line_without_a_traceback(tmp_path):
    write_notes(tmp_path / "notes.parquet", synthetic_notes(2))
    archive = tmp_path / "archive.jsonl"
    archive.write_bytes(b"\0" * 100 + b"\n")
    with OpenAIServer() as server:
        config = write_config(tmp_path, server, archive)
        env = {**os.environ, KEY_ENV: API_KEY, "PYTHONPATH": str(REPO)}
        done = subprocess.run(stage_command(tmp_path, config, "stage"), env=env, capture_output=True, text=True)
        assert server.requests == []
    log = (tmp_path / "stage.log").read_text()
    assert done.returncode == 1 and "Traceback" not in log + done.stderr
    assert [line for line in log.splitlines() if "ERROR" in line] == [
        line for line in log.splitlines() if f"{archive}:1: not valid JSON" in line
    ]
    assert len([line for line in log.splitlines() if "ERROR" in line]) == 1
