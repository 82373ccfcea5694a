"""The instruction engine against the local server: the same dataset whatever the latency and the
requests in flight, pools seen only from notes far enough before, post-filters, the exact
near-duplicate index and its memory, stage stats with every failure kind, no secrets or note text in logs, and
replay re-deriving the CSV byte for byte."""

from __future__ import annotations

import json
import random
import tracemalloc

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from asclepius_r.files import read_jsonl
from asclepius_r.instructions.generate import (
    NearDuplicateIndex,
    _Prefix,
    generate,
    run_instruction_stage,
    write_dataset,
)
from asclepius_r.llm import LLMClient
from asclepius_r.logs import setup_logging
from asclepius_r.rouge import rouge_l, tokens
from support.default_settings import generation_settings, llm_settings
from support.openai_server import OpenAIServer, default_responder, prompt_text
from tests.llm_fixtures import API_KEY, KEY_ENV, live_settings, server  # noqa: F401 (fixture)

CONDITIONS = (
    "community-acquired pneumonia",
    "atrial fibrillation",
    "cellulitis of the left leg",
    "diabetic ketoacidosis",
    "small bowel obstruction",
)


def synthetic_notes(n: int, first_row_id: int = 70000) -> list[dict]:
    """Made-up discharge summaries (no patient data)."""
    return [
        {
            "row_id": first_row_id + i,
            "subject_id": 9000 + i,
            "text": f"Admission Date: [**2150-1-{1 + i % 28}**]\nSynthetic patient {i} was admitted with "
            f"{CONDITIONS[i % len(CONDITIONS)]} and treated on the ward. Discharged home in stable condition.",
        }
        for i in range(n)
    ]


def write_notes(path, notes: list[dict]) -> None:
    pq.write_table(
        pa.table(
            {
                "ROW_ID": [n["row_id"] for n in notes],
                "SUBJECT_ID": [n["subject_id"] for n in notes],
                "TEXT": [n["text"] for n in notes],
            }
        ),
        path,
    )


def question_examples(prompt: str) -> list[str]:
    block = prompt.split("[Example Questions Begin]\n")[1].split("\n[Example Questions End]")[0]
    return [line[2:] for line in block.splitlines()]


def test_latency_and_concurrency_change_nothing_and_pools_come_only_from_notes_far_enough_before(monkeypatch, tmp_path):
    monkeypatch.setenv(KEY_ENV, API_KEY)
    notes = synthetic_notes(40)
    write_notes(tmp_path / "notes.parquet", notes)
    settings = generation_settings(seed=42, pool_lag=6)
    for seed, concurrency in ((1, 1), (2, 16)):  # log-normal latencies, drawn differently
        with OpenAIServer(latency_s=0.005, latency_sigma=1.0, seed=seed) as server:
            client = LLMClient(live_settings(server, tmp_path / f"{seed}.jsonl", max_concurrency=concurrency))
            run_instruction_stage(
                tmp_path / "notes.parquet", tmp_path / f"{seed}.jsonl.out", tmp_path / "s.json", client, settings
            )
        write_dataset(tmp_path / "notes.parquet", tmp_path / f"{seed}.jsonl.out", tmp_path / f"{seed}.csv")
    assert (tmp_path / "1.csv").read_bytes() == (tmp_path / "2.csv").read_bytes()
    assert read_jsonl(tmp_path / "1.jsonl.out") == read_jsonl(tmp_path / "2.jsonl.out")

    records = read_jsonl(tmp_path / "1.jsonl.out")
    position_of = {r["question"]: i for i, r in enumerate(records)}
    prompts = {
        line["meta"]["row_id"]: line["request"]["messages"][0][1]
        for line in read_jsonl(tmp_path / "1.jsonl")
        if line["meta"]["phase"] == "question"
    }
    from_pool = 0
    for position, note in enumerate(notes):
        examples = question_examples(prompts[note["row_id"]])
        generated = [q for q in examples if q.startswith("Which finding")]
        assert all(position_of[q] <= position - 6 for q in generated)  # settled before this note began
        assert 3 <= len(examples) <= 5
        from_pool += len(generated)
    assert from_pool > 0
    assert all(r["status"] == "ok" and r["task"] for r in records)


def test_post_filters_reject_model_talk_and_answers_that_ask_back(server, tmp_path):
    def responder(body):
        prompt = prompt_text(body)
        if "[Example Questions Begin]" not in prompt:
            if "Synthetic patient 1 " in prompt:
                return "As an AI language model, I cannot give medical advice."
            if "Synthetic patient 2 " in prompt:
                return "Could you clarify which admission you mean?"
        return default_responder(body)

    server.responder = responder
    records, stats = generate(
        synthetic_notes(4), LLMClient(live_settings(server, tmp_path / "a.jsonl")), generation_settings(pool_lag=4)
    )
    assert [r["status"] for r in records] == ["ok", "rejected_model_mention", "rejected_answer_is_question", "ok"]
    assert stats["outcomes"] == {"ok": 2, "rejected_answer_is_question": 1, "rejected_model_mention": 1}


def questions_with_near_duplicates(count: int, seed: int) -> list[str]:
    """Zipf-worded questions, half of them edits (a word dropped, added or replaced) of an earlier one."""
    rng = random.Random(seed)
    words = [f"w{i}" for i in range(60)]
    weights = [1 / (rank + 1) for rank in range(len(words))]
    questions: list[str] = []
    for _ in range(count):
        if questions and rng.random() < 0.5:
            edited = rng.choice(questions).split()
            for _ in range(rng.randint(1, 3)):
                at = rng.randrange(len(edited) + 1)
                edit = rng.choice(("drop", "add", "replace"))
                if edit == "drop" and len(edited) > 1 and at < len(edited):
                    del edited[at]
                elif edit == "add":
                    edited.insert(at, rng.choices(words, weights)[0])
                elif at < len(edited):
                    edited[at] = rng.choices(words, weights)[0]
            questions.append(" ".join(edited))
        else:
            questions.append(" ".join(rng.choices(words, weights, k=rng.randint(1, 14))))
    return questions


@pytest.mark.parametrize("threshold", [0.5, 0.7, 0.9])
def test_near_duplicate_index_keeps_exactly_what_the_all_pairs_scan_keeps(threshold):
    questions = questions_with_near_duplicates(500, seed=int(threshold * 10))
    index, kept, dropped = NearDuplicateIndex(threshold), [], 0
    for question in questions:  # through several rebuilds of the index (at 64 and 128 kept questions)
        brute_force = any(rouge_l(question, earlier) > threshold for earlier in kept)
        assert index.is_near_duplicate(question) == brute_force, question
        if brute_force:
            dropped += 1
        else:
            kept.append(question)
            index.add(question)
    assert len(kept) > 128 and dropped > 50


def test_the_filter_holds_words_not_objects_per_question():
    """At 57k notes every question stays in the index: its memory must grow by the words held
    (two 4-byte codes and a posting or so each), not by objects per question, which grew the
    stage by hundreds of bytes a note."""
    questions = questions_with_near_duplicates(6000, seed=3)
    index = NearDuplicateIndex(0.7, questions[:1000])
    tracemalloc.start()
    try:
        for question in questions[1000:]:  # through a rebuild of the whole index, at 2048 and 4096
            index.add(question)
        grown = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    words = sum(len(tokens(question)) for question in questions[1000:])
    assert len(index) == 6000
    assert grown < 20 * words + 16 * 5000


def test_a_pool_prefix_draws_what_its_copy_draws():
    """Pools are shown through a view of their first items, not a copy per note; `random.sample`
    must pick the same questions from it, or every prompt (and archive key) would change."""
    questions = [f"question {i}?" for i in range(300)]
    for length in range(0, 300, 7):
        for seed in range(5):
            k = min(2, length)
            assert random.Random(seed).sample(_Prefix(questions, length), k) == random.Random(seed).sample(
                questions[:length], k
            )


def test_near_duplicate_filter_in_the_engine(server, tmp_path):
    server.responder = lambda body: (
        "Which medications were started during the admission?"
        if "[Example Questions Begin]" in prompt_text(body)
        else "Aspirin was started."
    )
    records, _ = generate(
        synthetic_notes(16),
        LLMClient(live_settings(server, tmp_path / "a.jsonl")),
        generation_settings(pool_lag=16, near_duplicate_rouge=0.7),
    )
    statuses = {}
    for record in records:
        statuses.setdefault(record["task"], []).append(record["status"])
    # the first of each task is kept and every later identical question dropped
    assert all(s[0] == "ok" and set(s[1:]) <= {"rejected_near_duplicate"} for s in statuses.values())
    assert sum(s.count("ok") for s in statuses.values()) == len(statuses) < 16


def test_stage_stats_count_failures_and_logs_hold_neither_key_nor_note(server, tmp_path):
    server.add_fault("rate_limit", times=3, retry_after=0.01)
    server.add_fault("server_error", times=None, match="Synthetic patient 3 ")
    server.add_fault("http_error", status=400, echo_request=True, times=1, match="Synthetic patient 5 ")
    server.add_fault("length", times=2)
    notes = synthetic_notes(8)
    write_notes(tmp_path / "notes.parquet", notes)
    log_file = tmp_path / "stage.log"
    setup_logging(str(log_file))
    try:
        stats = run_instruction_stage(
            tmp_path / "notes.parquet",
            tmp_path / "records.jsonl",
            tmp_path / "stats.json",
            LLMClient(live_settings(server, tmp_path / "a.jsonl")),
            generation_settings(pool_lag=4),
        )
    finally:
        setup_logging()
    assert stats == json.loads((tmp_path / "stats.json").read_text())
    assert stats["outcomes"] == {"failed_question": 2, "ok": 6}
    llm = stats["llm"]
    assert llm["retries"]["rate_limited"] == 3 and llm["retries"]["finish_length"] == 2
    assert llm["failures"]["server_error"] == 1 and llm["failures"]["http_400"] == 1
    assert llm["usage"]["prompt_tokens"] > 0 and llm["cost_usd"] > 0
    text = log_file.read_text()
    assert "row_id=70003" in text and "instructions:" in text
    outputs = text + (tmp_path / "stats.json").read_text() + (tmp_path / "records.jsonl").read_text()
    assert API_KEY not in outputs + (tmp_path / "a.jsonl").read_text()
    assert not any(note["text"].splitlines()[1][:40] in text for note in notes)


def test_replay_re_derives_the_dataset_byte_for_byte(server, tmp_path):
    notes = synthetic_notes(20)
    write_notes(tmp_path / "notes.parquet", notes)
    server.add_fault("server_error", times=None, match="Synthetic patient 4 ")  # a failure replay must repeat
    server.add_fault("length", times=2)
    archive = tmp_path / "archive.jsonl"
    settings = generation_settings(pool_lag=8)
    run_instruction_stage(
        tmp_path / "notes.parquet",
        tmp_path / "live.jsonl",
        tmp_path / "live.json",
        LLMClient(live_settings(server, archive)),
        settings,
    )
    write_dataset(tmp_path / "notes.parquet", tmp_path / "live.jsonl", tmp_path / "live.csv")
    sent = len(server.requests)

    replay = LLMClient(llm_settings(backend="replay", archive=str(archive)))
    stats = run_instruction_stage(
        tmp_path / "notes.parquet", tmp_path / "replay.jsonl", tmp_path / "replay.json", replay, settings
    )
    write_dataset(tmp_path / "notes.parquet", tmp_path / "replay.jsonl", tmp_path / "replay.csv")
    assert (tmp_path / "replay.csv").read_bytes() == (tmp_path / "live.csv").read_bytes()
    assert read_jsonl(tmp_path / "replay.jsonl") == read_jsonl(tmp_path / "live.jsonl")
    assert len(server.requests) == sent and stats["llm"]["archived"] == stats["llm"]["requests"]
    assert stats["outcomes"]["failed_question"] == 1 and b"\r\n" not in (tmp_path / "live.csv").read_bytes()


def test_batch_mode_gathers_each_round_of_requests_into_one_batch_and_gives_the_same_dataset(server, tmp_path):
    notes = synthetic_notes(12)
    settings = generation_settings(pool_lag=6)
    online, _ = generate(notes, LLMClient(live_settings(server, tmp_path / "online.jsonl")), settings)
    batched, _ = generate(notes, LLMClient(live_settings(server, tmp_path / "batch.jsonl", mode="batch")), settings)
    assert batched == online
    # questions of notes 0-5, their answers, then the same for notes 6-11: four batches
    assert sum(1 for r in server.requests if r.method == "POST" and r.path == "/batches") == 4
