"""The judge protocol over real HTTP: one prompt per question with shuffled agents, strict
parsing, retries by correction, parse failures recorded (not scored 0), archive and PHI guard."""

from __future__ import annotations

import pytest

from asclepius_r import config as workflow_config
from asclepius_r.evaluate.heldout import summarise
from asclepius_r.evaluate.judge import JudgeParseError, agent_order, judge, judge_client, parse_scores
from asclepius_r.evaluate.rubric_judge import ReferenceRubricJudge, rubric_score
from asclepius_r.files import read_jsonl, write_jsonl
from asclepius_r.llm import LLMClient, LLMSettings
from asclepius_r.llm.guard import UnapprovedEndpointError
from asclepius_r.prompts import render_judge_prompt
from support.default_settings import judge_settings, llm_settings
from support.openai_server import OpenAIServer

MODELS = ["Base-7B", "Asclepius-R-7B-Pretrained-Only", "Asclepius-R-7B"]
ITEMS = [
    {
        "row_id": 50000 + i,
        "task": "Summarization",
        "note": f"Synthetic note {i}: pneumonia, treated.",
        "question": f"Summarise note {i}.",
        "reference": f"pneumonia treated with antibiotics {i}",
    }
    for i in range(4)
]
ANSWERS = {m: {item["row_id"]: f"{m} says pneumonia {item['row_id']}" for item in ITEMS} for m in MODELS}


def settings_for(server: OpenAIServer, tmp_path, approved: bool = True) -> LLMSettings:
    return llm_settings(
        backend="openai",
        model="judge-model",
        base_url=server.url,
        api_key_env="JUDGE_TEST_KEY",
        approved_endpoints=[server.url] if approved else [],
        archive=str(tmp_path / "judge.jsonl"),
        temperature=0.0,
        max_tokens=64,
        max_attempts=2,
        backoff_base_s=0.01,
        backoff_max_s=0.02,
    )


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv("JUDGE_TEST_KEY", "test-key")


def agent_count(body: dict) -> int:
    return body["messages"][0]["content"].count("'s Answer Begin]")


def test_agent_order_is_fixed_per_note_and_differs_between_notes():
    orders = [agent_order(MODELS, row_id, seed=42) for row_id in range(50000, 50020)]
    assert orders[0] == agent_order(list(reversed(MODELS)), 50000, seed=42), "input order must not matter"
    assert len({tuple(o) for o in orders}) > 1, "positions must be shuffled across notes"
    assert [agent_order(MODELS, row_id, seed=7) for row_id in range(50000, 50020)] != orders, "the seed matters"


@pytest.mark.parametrize(
    "reply,expected", [("4 3 1", [4, 3, 1]), ("4, 3, 1\nA is complete.", [4, 3, 1]), ("  2 2 2  \n", [2, 2, 2])]
)
def test_parse_scores_reads_the_first_line(reply, expected):
    assert parse_scores(reply, 3) == expected


@pytest.mark.parametrize(
    "reply", ["4 3", "4 3 1 2", "Scores: 4 3 1", "4 3 5", "0 3 1", "", "A: 4 B: 3 C: 1", "Agent A deserves 4\n4 3 1"]
)
def test_parse_scores_is_strict(reply):
    with pytest.raises(JudgeParseError):
        parse_scores(reply, 3)


def test_judge_prompt_holds_every_answer_in_agent_order(tmp_path):
    bodies = []

    def responder(body):
        bodies.append(body)
        return " ".join("4" for _ in range(agent_count(body)))

    with OpenAIServer(responder=responder) as server:
        verdicts = judge(ITEMS, ANSWERS, LLMClient(settings_for(server, tmp_path)), judge_settings(seed=42))
    assert len(bodies) == len(ITEMS), "one request per question, with every model inside"
    for verdict in verdicts:
        item = next(i for i in ITEMS if i["row_id"] == verdict["row_id"])
        order = agent_order(MODELS, item["row_id"], 42)
        assert list(verdict["agents"].values()) == order and list(verdict["agents"]) == ["A", "B", "C"]
        expected = render_judge_prompt(item["note"], item["question"], [ANSWERS[m][item["row_id"]] for m in order])
        assert any(b["messages"][0]["content"] == expected for b in bodies)
        assert verdict["status"] == "ok" and verdict["scores"] == {m: 4 for m in MODELS}


def test_unreadable_reply_is_retried_with_a_correction(tmp_path):
    def responder(body):
        if len(body["messages"]) == 1:
            return "Agent A is best, then B."  # not a score line
        return "1 2 3\nReasons follow."

    with OpenAIServer(responder=responder) as server:
        verdicts = judge(ITEMS, ANSWERS, LLMClient(settings_for(server, tmp_path)), judge_settings(seed=1))
        retries = [r for r in server.chat_requests() if len(r.body["messages"]) == 3]
    assert len(retries) == len(ITEMS)
    retry = retries[0].body["messages"]
    assert retry[1] == {"role": "assistant", "content": "Agent A is best, then B."}
    assert "could not be read" in retry[2]["content"]
    for verdict in verdicts:
        assert verdict["status"] == "ok" and verdict["attempts"] == 2
        assert [verdict["scores"][verdict["agents"][label]] for label in "ABC"] == [1, 2, 3]


def test_parse_failures_are_recorded_and_not_scored_zero(tmp_path):
    with OpenAIServer(responder=lambda body: "I cannot score these.") as server:
        verdicts = judge(
            ITEMS, ANSWERS, LLMClient(settings_for(server, tmp_path)), judge_settings(seed=42, max_parse_attempts=3)
        )
        assert len(server.chat_requests()) == 3 * len(ITEMS)
    assert {v["status"] for v in verdicts} == {"parse_failed"}
    assert all(v["attempts"] == 3 and len(v["unreadable_replies"]) == 3 and "scores" not in v for v in verdicts)

    # The summary leaves them out of the mean and counts them.
    answer_files = {}
    for model in MODELS:
        answer_files[model] = tmp_path / f"{model}.jsonl"
        write_jsonl(
            answer_files[model],
            [
                {
                    "row_id": i["row_id"],
                    "task": i["task"],
                    "question": i["question"],
                    "answer": ANSWERS[model][i["row_id"]],
                    "rouge_l": 0.5,
                    "token_f1": 0.5,
                    "answer_words": 4,
                }
                for i in ITEMS
            ],
        )
    verdicts[0] = {**verdicts[0], "status": "ok", "scores": {m: 4 for m in MODELS}}
    write_jsonl(tmp_path / "verdicts.jsonl", verdicts)
    summary = summarise(
        answer_files, tmp_path / "verdicts.jsonl", tmp_path / "s.json", tmp_path / "m.tsv", tmp_path / "t.tsv"
    )
    for model in MODELS:
        assert summary[model]["judge_score"] == 4, "failures must not pull the mean towards 0"
        assert summary[model]["judge_scored"] == 1 and summary[model]["judge_failed"] == len(ITEMS) - 1
    header, *rows = (tmp_path / "m.tsv").read_text().splitlines()
    assert header.split("\t")[:4] == ["model", "n", "judge_score", "judge_scored"] and len(rows) == len(MODELS)


def test_server_errors_become_llm_failed_verdicts(tmp_path):
    with OpenAIServer() as server:
        server.add_fault("server_error", times=None)
        verdicts = judge(ITEMS[:1], ANSWERS, LLMClient(settings_for(server, tmp_path)), judge_settings())
    assert verdicts[0]["status"] == "llm_failed" and "scores" not in verdicts[0]


def test_archive_means_a_rerun_sends_nothing(tmp_path):
    def responder(body):
        return " ".join("3" for _ in range(agent_count(body)))

    with OpenAIServer(responder=responder) as server:
        first = judge(ITEMS, ANSWERS, LLMClient(settings_for(server, tmp_path)), judge_settings())
        sent = len(server.chat_requests())
        again = judge(ITEMS, ANSWERS, LLMClient(settings_for(server, tmp_path)), judge_settings())
        assert len(server.chat_requests()) == sent == len(ITEMS)
    assert [v["scores"] for v in first] == [v["scores"] for v in again]
    assert all(r["meta"]["phase"] == "judge" for r in read_jsonl(tmp_path / "judge.jsonl"))


def test_guard_refuses_an_unapproved_judge_endpoint_before_sending(tmp_path):
    with OpenAIServer() as server:
        with pytest.raises(UnapprovedEndpointError):
            judge(ITEMS, ANSWERS, LLMClient(settings_for(server, tmp_path, approved=False)), judge_settings())
        assert server.chat_requests() == []


def test_demo_heuristic_judge_is_deterministic_and_offline(tmp_path):
    config = workflow_config.load("demo/config.yaml", require_data=False)
    config["judge"]["archive"] = str(tmp_path / "judge.jsonl")
    references = {i["row_id"]: i["reference"] for i in ITEMS}
    answers = {"good": {i["row_id"]: i["reference"] for i in ITEMS}, "noise": {i["row_id"]: "zzz" for i in ITEMS}}
    client = judge_client(config, references)
    assert isinstance(client.backend, ReferenceRubricJudge)
    verdicts = judge(ITEMS, answers, client, judge_settings(seed=config["seed"]))
    assert all(v["status"] == "ok" and v["scores"] == {"good": 4, "noise": 1} for v in verdicts)
    replies = [r["result"]["text"] for r in read_jsonl(tmp_path / "judge.jsonl")]
    assert all("not a language model" in reply for reply in replies), "the archive says the verdicts are heuristic"
    assert judge(ITEMS, answers, judge_client(config, references), judge_settings(seed=42)) == verdicts
    assert [rubric_score(a, "a b c d e f g h i j") for a in ("a b c d e f g h i j", "a b c", "a", "")] == [4, 3, 2, 1]


def test_judge_endpoint_of_its_own_must_be_approved_too(tmp_path):
    config = workflow_config.load("demo/config.yaml", require_data=False)
    with OpenAIServer() as llm_server, OpenAIServer() as judge_server:
        config["llm"].update(
            backend="openai", base_url=llm_server.url, api_key_env="JUDGE_TEST_KEY", approved_endpoints=[llm_server.url]
        )
        config["judge"].update(backend="llm", base_url=judge_server.url, archive=str(tmp_path / "judge.jsonl"))
        with pytest.raises(UnapprovedEndpointError, match=str(judge_server.port)):
            judge_client(config, {})
        config["llm"]["approved_endpoints"].append(judge_server.url)
        client = judge_client(config, {})
        verdicts = judge(ITEMS[:1], ANSWERS, client, judge_settings())
        assert judge_server.chat_requests() and not llm_server.chat_requests()
    assert verdicts[0]["status"] == "parse_failed", "the test server's default reply is no score line"
