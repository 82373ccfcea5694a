"""The instruction stage and the judge against a real local OpenAI-compatible server.

PhysioNet allows notes to go to a locally deployed model; users serve one with vLLM, `transformers
serve` or llama.cpp's server. Here it is `transformers serve` (transformers' own FastAPI and
uvicorn code, support/local_llm_server.py) with SmolLM2-135M-Instruct on the CPU, on 127.0.0.1,
nothing from a hub, and llama.cpp's `llama-server` with the same model's GGUF file where it was
built (`make llama-server`, support/llama_cpp_server.py; skipped otherwise): the client, the PHI
guard, the archive and the reply parsers meet real servers' replies, not only those of
support/openai_server.py, which plays the faults. Everything is judged by behaviour: what the
server's log says it answered, what the archive, the records and the logs hold, and what was
counted and charged.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from asclepius_r import config as workflow_config
from asclepius_r.base_model.smollm2 import fetch_gguf
from asclepius_r.evaluate.judge import JudgeSettings, judge_client, run_judge_stage
from asclepius_r.files import read_jsonl, write_jsonl
from asclepius_r.llm import Archive, ChatRequest, LLMClient, UnapprovedEndpointError
from support.default_settings import llm_settings
from support.llama_cpp_server import BuildFailed, LlamaCppServer, build_binary, built_binary
from support.local_llm_server import LocalServer, TransformersServer, smollm2_folder
from tests.conftest import REPO

pytestmark = pytest.mark.local_server

KEY_ENV = "ASCLEPIUS_LOCAL_LLM_KEY"
KEY = "sk-local-5c1e9a-never-in-outputs"  # the server asks for none; the client sends it all the same
# The demo's three shortest notes: SmolLM2 reads a prompt of about 400 tokens on a CPU in seconds.
NOTES = ["12-addendum-to-04.txt", "24-addendum-to-22.txt", "48-addendum-to-42.txt"]
MAX_TOKENS = 16  # generation is what costs time on a CPU: short replies, cut at `length`
PRICE = {"input": 1.0, "output": 2.0}  # dollars a million tokens, so that cost checks the counts


@pytest.fixture(scope="module", params=[TransformersServer.NAME, LlamaCppServer.NAME])
def served(request, tmp_path_factory):
    """Each real server in turn, serving SmolLM2 with one thread: on a shared CPU a second one
    spins against the other work, 6x slower (BENCHMARKS.md, "Instructions and the LLM client")."""
    log_path = tmp_path_factory.mktemp("serve") / "serve.log"
    if request.param == TransformersServer.NAME:
        server = TransformersServer(smollm2_folder(), threads=1, log_path=log_path)
    elif binary := built_binary():
        server = LlamaCppServer(binary, fetch_gguf(), api_key=KEY, threads=1, log_path=log_path)
    else:
        pytest.skip("llama-server is not built: `make llama-server` builds it (cmake, a C++ compiler)")
    with server:
        yield server


@pytest.fixture
def key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)


def demo_notes() -> list[dict]:
    return [
        {"row_id": 100 + i, "text": (REPO / "demo" / "discharge_summaries" / name).read_text()}
        for i, name in enumerate(NOTES)
    ]


def local_llm(server: LocalServer, archive, **overrides) -> dict:
    """The llm section a user writes for a local server (docs/llm-endpoints.md)."""
    return {
        "backend": "openai",
        "model": server.model,  # the name the server knows its model by
        "base_url": server.url,
        "approved_endpoints": [server.url],
        "api_key_env": KEY_ENV,
        "archive": str(archive),
        "temperature": 0.0,
        "max_tokens": MAX_TOKENS,
        # A reply cut at max_tokens is used as it is (the question is its first line): SmolLM2 at
        # greedy decoding would give the same cut reply to every retry.
        "retry_finish_reasons": ["content_filter"],
        # One generation at a time (transformers serve without continuous batching, llama-server
        # with one thread): a queue of two, and time for it.
        "max_concurrency": 2,
        "timeout_s": 900,
        "prices_per_million": {server.model: PRICE},
        "budget_usd": 1.0,
        **overrides,
    }


def files_holding(root, text: str) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.is_file() and text.encode() in p.read_bytes()]


def archived(path) -> list[dict]:
    Archive(path)  # reads and checks every record (a damaged one raises, naming file and line)
    return [json.loads(line) for line in path.read_text().splitlines()]


def check_billing(records: list[dict], llm_stats: dict) -> None:
    """The counts and the cost are the archive's billed records' usage, all as the server reported it."""
    billed = [r["result"] for r in records if r["result"]["status"] in ("ok", "retry")]
    usage = llm_stats["usage"]
    assert usage["billed_responses"] == len(billed) and usage["billed_at_worst_case"] == 0
    prompt = sum(r["usage"]["prompt_tokens"] for r in billed)
    completion = sum(r["usage"]["completion_tokens"] for r in billed)
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == (prompt, completion)
    assert llm_stats["cost_usd"] == pytest.approx((prompt * PRICE["input"] + completion * PRICE["output"]) / 1e6)
    for record in records:
        if record["result"]["status"] in ("ok", "retry"):
            request_bytes = sum(len(text.encode()) for _, text in record["request"]["messages"])
            tokens = record["result"]["usage"]
            # a real tokenizer's counts: fewer prompt tokens than bytes, never past max_tokens
            assert 0 < tokens["prompt_tokens"] < request_bytes and 0 < tokens["completion_tokens"] <= MAX_TOKENS


def test_the_instruction_stage_against_a_real_server(served, tmp_path):
    notes = demo_notes()
    notes_path = tmp_path / "notes.parquet"
    pq.write_table(pa.table({"ROW_ID": [n["row_id"] for n in notes], "TEXT": [n["text"] for n in notes]}), notes_path)
    archive = tmp_path / "archive.jsonl"
    online, replay = tmp_path / "online.yaml", tmp_path / "replay.yaml"
    online.write_text(yaml.safe_dump({"llm": local_llm(served, archive)}))
    replay.write_text(yaml.safe_dump({"llm": {"backend": "replay"}}))

    def stage(*layers, out: str) -> dict:
        """The stage's package entry, as a user runs it, in a process of its own."""
        command = [sys.executable, "-m", "asclepius_r.instructions.generate", "--config", str(REPO / "config.yaml")]
        command += [arg for layer in layers for arg in ("--config", str(layer))]
        command += ["--notes", str(notes_path), "--records", str(tmp_path / f"{out}.jsonl")]
        command += ["--stats", str(tmp_path / f"{out}.stats.json"), "--log", str(tmp_path / f"{out}.log")]
        command += ["--dataset", str(tmp_path / f"{out}.csv")]
        environment = {**os.environ, KEY_ENV: KEY, "PYTHONPATH": str(REPO)}
        done = subprocess.run(command, cwd=tmp_path, env=environment, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-3000:]
        assert KEY not in done.stdout + done.stderr
        return json.loads((tmp_path / f"{out}.stats.json").read_text())

    before = served.chat_statuses()
    stats = stage(online, out="records")
    llm = stats["llm"]
    answered = served.chat_statuses() - before
    assert answered == {200: llm["attempts"]} and llm["attempts"] >= len(notes), "every attempt reached the server"
    assert llm["failed"] == 0 and llm["sent_ok"] == llm["attempts"] == llm["requests"]

    records = read_jsonl(tmp_path / "records.jsonl")
    assert [r["row_id"] for r in records] == [n["row_id"] for n in notes]
    assert sum(stats["outcomes"].values()) == len(notes) and "failed_question" not in stats["outcomes"]
    for record in records:
        assert record["status"] == "ok" or record["status"].startswith("rejected_"), record["status"]
        assert isinstance(record["question"], str) and "\n" not in record["question"]
        if record["status"] == "ok":
            assert record["answer"].strip() == record["answer"] and record["answer"]

    lines = archived(archive)
    assert len(lines) == llm["attempts"] and {r["request"]["model"] for r in lines} == {served.model}
    assert {r["result"]["finish_reason"] for r in lines} <= {"stop", "length"}
    assert all(r["result"]["provider"]["id"] for r in lines), "the server's ids are kept: short names"
    check_billing(lines, llm)

    assert not files_holding(tmp_path, KEY), "the key reached a file"
    log_text = (tmp_path / "records.log").read_text()
    assert not [line for n in notes for line in n["text"].splitlines() if len(line) > 30 and line in log_text]

    # The archive replays the run byte for byte with no server; an online rerun sends nothing.
    stage(online, replay, out="replayed")
    assert (tmp_path / "replayed.jsonl").read_bytes() == (tmp_path / "records.jsonl").read_bytes()
    assert (tmp_path / "replayed.csv").read_bytes() == (tmp_path / "records.csv").read_bytes()
    rerun = stage(online, out="rerun")["llm"]
    assert rerun["archived"] == llm["requests"] and rerun["attempts"] == 0
    assert served.chat_statuses() - before == answered


def test_the_judge_against_a_real_server(served, tmp_path, key, caplog):
    notes = demo_notes()[:1]  # one question, two models' answers: the judge's prompt is the longest
    items = [
        {"row_id": n["row_id"], "note": n["text"], "question": "What changed after discharge?", "task": "Summarization"}
        for n in notes
    ]
    answers = {
        "Asclepius-R-7B": "The discharge medication list was corrected and the patient was told.",
        "Base-7B": "I am not sure.",
    }
    answer_files = {}
    for model, answer in answers.items():
        answer_files[model] = tmp_path / f"{model}.jsonl"
        write_jsonl(answer_files[model], [{"row_id": n["row_id"], "answer": answer} for n in notes])
    overlay = tmp_path / "local.yaml"
    judge_archive = tmp_path / "judge.jsonl"
    overlay.write_text(
        yaml.safe_dump(
            {
                "llm": local_llm(served, tmp_path / "archive.jsonl"),
                "judge": {
                    "backend": "llm",
                    "model": served.model,
                    "archive": str(judge_archive),
                    "max_tokens": 16,
                    "max_parse_attempts": 2,
                },
            }
        )
    )
    config = workflow_config.load_layers([REPO / "config.yaml", overlay])
    before = served.chat_statuses()
    with caplog.at_level(logging.DEBUG), judge_client(config, {}) as client:
        stats = run_judge_stage(
            items,
            answer_files,
            tmp_path / "verdicts.jsonl",
            tmp_path / "judge.stats.json",
            client,
            JudgeSettings.from_config(config),
        )
    attempts = stats["client"]["attempts"]
    assert served.chat_statuses() - before == {200: attempts}

    verdicts = read_jsonl(tmp_path / "verdicts.jsonl")
    assert [v["row_id"] for v in verdicts] == [n["row_id"] for n in notes]
    for verdict in verdicts:
        assert set(verdict["agents"].values()) == set(answers)
        if verdict["status"] == "ok":  # the reply's first line held one score 1-4 per agent
            assert set(verdict["scores"]) == set(answers) and set(verdict["scores"].values()) <= {1, 2, 3, 4}
        else:  # anything else is a parse failure after the correction turn, never a score of 0
            assert verdict["status"] == "parse_failed"
            assert verdict["attempts"] == len(verdict["unreadable_replies"]) == 2
    assert attempts == sum(v["attempts"] for v in verdicts)

    lines = archived(judge_archive)
    assert len(lines) == attempts and {r["request"]["model"] for r in lines} == {served.model}
    # a correction is a conversation: the prompt, the unreadable reply, the correction
    corrections = [r for r in lines if len(r["request"]["messages"]) > 1]
    assert all([role for role, _ in r["request"]["messages"]] == ["user", "assistant", "user"] for r in corrections)
    assert len(corrections) == sum(v["attempts"] - 1 for v in verdicts)
    check_billing(lines, stats["client"])
    assert not files_holding(tmp_path, KEY) and KEY not in caplog.text
    assert not [line for n in notes for line in n["text"].splitlines() if len(line) > 30 and line in caplog.text]


def test_a_short_prompt_and_a_reply_cut_short(served, tmp_path, key):
    """SmolLM2's chat template adds a default system prompt: 2 bytes are 31 tokens, which is
    honest usage, not a lie; a reply cut at max_tokens is retried, then failed as finish_length,
    each attempt charged at the usage the server reported."""
    settings = llm_settings(
        **local_llm(served, tmp_path / "a.jsonl", max_tokens=1, max_attempts=2, backoff_base_s=0.01)
        | {"retry_finish_reasons": ["length", "content_filter"]}
    )
    hi = ChatRequest(model=served.model, messages=(("user", "Hi"),), max_tokens=1, temperature=0.0)
    before = served.chat_statuses()
    with LLMClient(settings) as client:
        [result] = client.run([hi])
        stats = client.stats
    assert served.chat_statuses() - before == {200: 2}
    assert result.status == "failed" and result.error.startswith("finish_length")
    assert stats["retries"]["finish_length"] == 2 and stats["retries"]["malformed"] == 0
    lines = archived(tmp_path / "a.jsonl")
    usages = [r["result"]["usage"] for r in lines if r["result"]["status"] == "retry"]
    assert len(usages) == 2 and usages[0] == usages[1] and usages[0]["completion_tokens"] == 1
    assert usages[0]["prompt_tokens"] > 2 + 2 * 8, "the template's own tokens, beyond bytes and framing"
    assert stats["usage"]["billed_at_worst_case"] == 0


def test_a_model_the_server_does_not_serve_and_an_unapproved_spelling(served, tmp_path, key):
    """A pinned transformers serve answers another model name with HTTP 400: failed at once, not
    retried, and the error says what failed, never what the server said. `localhost` is not the
    approved `127.0.0.1`: refused before anything is sent."""
    if not isinstance(served, TransformersServer):
        pytest.skip("llama-server answers any model name with the one it serves")
    settings = llm_settings(**local_llm(served, tmp_path / "a.jsonl"))
    other = ChatRequest(model="gpt-4o-mini", messages=(("user", "Hi"),), max_tokens=1)
    before = served.chat_statuses()
    with LLMClient(settings) as client:
        [result] = client.run([other])
        assert client.stats["failures"]["http_400"] == 1 and client.stats["attempts"] == 1
    assert result.status == "failed" and result.error == "http_400: HTTP 400 (POST /v1/chat/completions)"
    assert served.chat_statuses() - before == {400: 1}

    elsewhere = served.url.replace("127.0.0.1", "localhost")
    with pytest.raises(UnapprovedEndpointError, match="approved_endpoints"):
        LLMClient(llm_settings(**local_llm(served, tmp_path / "b.jsonl", base_url=elsewhere)))
    assert served.chat_statuses() - before == {400: 1}


def test_a_wrong_key_is_refused_by_llama_server_and_never_retried_or_shown(served, tmp_path, monkeypatch):
    """llama-server checks the API key: a wrong one is HTTP 401, failed at once and not retried,
    and neither key is in the error, the archive or the stats."""
    if not isinstance(served, LlamaCppServer):
        pytest.skip("transformers serve asks for no key")
    wrong = "sk-local-wrong-key-0000"
    monkeypatch.setenv(KEY_ENV, wrong)
    settings = llm_settings(**local_llm(served, tmp_path / "a.jsonl"))
    hi = ChatRequest(model=served.model, messages=(("user", "Hi"),), max_tokens=1)
    before = served.chat_statuses()
    with LLMClient(settings) as client:
        [result] = client.run([hi])
        stats = client.stats
    assert served.chat_statuses() - before == {401: 1} and stats["attempts"] == 1
    # the error keeps the server's error type and code, never its message
    assert result.status == "failed" and result.error.startswith("http_401: HTTP 401 (POST /v1/chat/completions")
    assert "authentication_error" in result.error and "Invalid API Key" not in result.error
    assert not files_holding(tmp_path, wrong) and not files_holding(tmp_path, KEY)
    assert wrong not in json.dumps(stats)


def test_building_llama_server_without_cmake_says_so_and_leaves_nothing(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("ASCLEPIUS_CACHE", str(cache))
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    with pytest.raises(BuildFailed, match=r"needs cmake and c\+\+ on PATH"):
        build_binary()
    assert built_binary() is None and not cache.exists()
