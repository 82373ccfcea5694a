"""A server, or a proxy in front of it, that echoes what it was sent: the Authorization header and
the prompt (the note) go into every reply field, error body, header and reason phrase it can. The
instruction stage (online and batch, run as its CLI in a subprocess with OPENAI_LOG=debug) and the
judge run against it; no file they write holds the key, and none holds the note outside the places
a note belongs (the archive's requests, the dataset's note column)."""

from __future__ import annotations

import base64
import csv
import json
import logging
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from asclepius_r.evaluate.judge import judge_client, run_judge_stage
from asclepius_r.files import write_jsonl
from asclepius_r.llm import LLMClient, ProviderError
from asclepius_r.llm.redact import Redactor
from support.default_settings import judge_settings
from support.openai_server import OpenAIServer
from tests.llm_fixtures import API_KEY, KEY_ENV, live_settings, requests, server  # noqa: F401 (fixture)
from tests.test_instructions_engine import write_notes
from tests.test_instructions_kill import REPO, stage_command, write_config

MARKER = "Quokka-Syndrome"


def marked_notes(n: int) -> list[dict]:
    """Made-up notes, each carrying MARKER: wherever it turns up, a note got there."""
    return [
        {
            "row_id": 80000 + i,
            "subject_id": 9100 + i,
            "text": f"Admission Date: [**2150-2-{1 + i}**]\nSynthetic patient {i} with {MARKER} {i}, treated and "
            "discharged home in stable condition.",
        }
        for i in range(n)
    ]


def key_fragments() -> list[bytes]:
    """Every 12-character piece of the key: a cut or partly redacted key leaks too."""
    return [API_KEY[i : i + 12].encode() for i in range(len(API_KEY) - 11)]


def assert_nothing_leaked(root: Path, archives: list[Path], dataset: Path | None = None) -> int:
    """Check every file under `root` the run wrote; returns how many were checked."""
    checked = 0
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.name != "notes.parquet"):
        data = path.read_bytes()
        if path in archives:  # the notes belong in the requests, nowhere else in a record
            data = b"\n".join(
                json.dumps({k: v for k, v in json.loads(line).items() if k != "request"}).encode()
                for line in data.splitlines()
            )
        if path == dataset:
            with open(path, newline="") as rows:
                data = json.dumps([{k: v for k, v in row.items() if k != "note"} for row in csv.DictReader(rows)])
                data = data.encode()
        assert not [f for f in key_fragments() if f in data], f"{path.name} holds the API key"
        assert MARKER.encode() not in data, f"{path.name} holds note text"
        checked += 1
    return checked


def hostile_faults(server: OpenAIServer) -> None:
    """Errors whose bodies the server fills with the echo too, and replies the client must refuse."""
    server.add_fault("server_error", times=2)
    server.add_fault("rate_limit", times=1, retry_after=0.05)
    server.add_fault("http_error", status=400, times=None, echo_request=True, match=f"{MARKER} 3,")
    server.add_fault("malformed", times=1)


@pytest.mark.parametrize("mode", ["online", "batch"])
def test_the_instruction_stage_writes_neither_key_nor_note_where_a_hostile_server_puts_them(tmp_path, mode):
    work = tmp_path / "run"
    work.mkdir()
    write_notes(work / "notes.parquet", marked_notes(6))
    env = {**os.environ, KEY_ENV: API_KEY, "PYTHONPATH": str(REPO), "OPENAI_LOG": "debug"}
    with OpenAIServer(hostile=True) as server:
        hostile_faults(server)
        config = write_config(work, server, work / "archive.jsonl")
        settings = yaml.safe_load(config.read_text())
        settings["llm"].update(mode=mode, batch_poll_s=0.05, max_attempts=3)
        config.write_text(yaml.safe_dump(settings))
        subprocess.run(stage_command(work, config, "stage"), env=env, check=True, timeout=300)
        assert server.requests and all(API_KEY in (r.authorization or "") for r in server.requests)
    records = [json.loads(line) for line in (work / "stage.jsonl").read_text().splitlines()]
    assert [r["status"] for r in records].count("failed_question") == 1  # the one the 400 refused
    assert any("[redacted]" in (r["answer"] or "") for r in records), "the key in an answer is replaced"
    log = (work / "stage.log").read_text()
    assert "HTTP Request" not in log and "Request options" not in log  # the SDK's loggers stay quiet
    archive = [json.loads(line)["result"] for line in (work / "archive.jsonl").read_text().splitlines()]
    assert {r["provider"].get("id") for r in archive if r["status"] == "ok"} == {None}  # not a name: dropped
    assert assert_nothing_leaked(work, [work / "archive.jsonl"], work / "stage.csv") >= 6


def test_the_judge_writes_neither_key_nor_note_where_a_hostile_server_puts_them(tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_ENV, API_KEY)
    notes = marked_notes(3)
    items = [
        {"row_id": n["row_id"], "task": "Summarization", "note": n["text"], "question": "What?", "reference": "x"}
        for n in notes
    ]
    answers = {}
    for model in ("Asclepius-R-7B", "Base-7B"):
        answers[model] = tmp_path / f"{model}.jsonl"
        write_jsonl(answers[model], [{"row_id": n["row_id"], "answer": f"{model} answer"} for n in notes])
    log = logging.FileHandler(tmp_path / "judge.log")
    logging.getLogger().addHandler(log)
    logging.getLogger().setLevel(logging.DEBUG)
    try:
        with OpenAIServer(hostile=True, responder=lambda body: "3 4") as server:
            hostile_faults(server)
            config = {
                "seed": 42,
                "llm": {**vars(live_settings(server, None, max_attempts=4)), "archive": None},
                "judge": {
                    "backend": "llm",
                    "model": "gpt-4o-mini",
                    "temperature": 0.0,
                    "max_tokens": 64,
                    "archive": str(tmp_path / "judge-archive.jsonl"),
                    "azure_deployment": None,
                    "base_url": None,
                },
            }
            with judge_client(config, {}) as client:
                stats = run_judge_stage(
                    items, answers, tmp_path / "verdicts.jsonl", tmp_path / "stats.json", client, judge_settings()
                )
    finally:
        logging.getLogger().removeHandler(log)
        log.close()
    # The key the server appends to each reply makes the score line unreadable: every reply is
    # kept as unreadable, redacted, and the question counted as not scored.
    assert stats["outcomes"] == {"parse_failed": 3}
    verdicts = (tmp_path / "verdicts.jsonl").read_text()
    assert "[redacted]" in verdicts
    assert assert_nothing_leaked(tmp_path, [tmp_path / "judge-archive.jsonl"]) >= 5


def test_ids_that_carry_the_key_stop_a_batch_run_and_reach_no_file(tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_ENV, API_KEY)
    archive = tmp_path / "a.jsonl"
    with OpenAIServer(hostile=True, ids_echo_key=True) as server:
        with pytest.raises(ProviderError, match="files.create") as stopped:
            LLMClient(live_settings(server, archive, mode="batch")).run(requests(3))
        assert server.files == {} and server.batches == {}, "the upload holding the notes was deleted"
    assert not [f for f in key_fragments() if f.decode() in str(stopped.value)]
    assert assert_nothing_leaked(tmp_path, [archive]) >= 1


def test_the_redaction_removes_the_key_and_url_credentials_in_every_form_they_are_sent(server, tmp_path):
    password, token = "pr0xy-passw0rd", "t0ken-in-the-url"
    settings = live_settings(
        server,
        None,
        proxy=f"http://bob:{password}@proxy.cluster:3128",
        approved_endpoints=[server.url, f"https://gw.example/v1?api-version=2024-10-21&access_token={token}"],
    )
    redact = Redactor.for_settings(settings, API_KEY)
    basic = base64.b64encode(f"bob:{password}".encode()).decode()
    echoed = f"Bearer {API_KEY}; Proxy-Authorization: Basic {basic}; {password}; token={token}; 2024-10-21"
    kept = redact(echoed)
    assert not [s for s in (API_KEY, basic, password, token) if s in kept]
    assert kept.endswith("2024-10-21"), "a value that is not a credential stays"
    assert redact.value({"id": [echoed]}) == {"id": [kept]}
