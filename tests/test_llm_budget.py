"""The budget caps what an archive costs: across runs, for every model that has one, against a
server that counts more tokens than four characters make, and against one that lies about what it
billed (no usage, negative or absurd usage) or never finishes its reply; and an edited archive
cannot lower what it counts."""

from __future__ import annotations

import json

import pytest

from asclepius_r import config as workflow_config
from asclepius_r.evaluate.judge import judge_client
from asclepius_r.llm import BudgetExceededError, ChatRequest, LLMClient, LLMSettings
from support.openai_server import OpenAIServer
from tests.llm_fixtures import KEY_ENV, live_settings, requests, server  # noqa: F401 (fixture)

PRICES = {"gpt-4o-mini": {"input": 1.0, "output": 1.0}}  # $ per million tokens: cost = tokens / 1e6


def test_the_budget_is_the_archives_across_runs(server, tmp_path):
    archive, budget, spent = tmp_path / "a.jsonl", 3e-4, []
    for run in ("first", "second", "third"):  # reruns, SLURM retries and later jobs alike
        client = LLMClient(
            live_settings(server, archive, prices_per_million=PRICES, budget_usd=budget, max_concurrency=1)
        )
        try:
            client.run(requests(6, prefix=f"{run} synthetic note"))
        except BudgetExceededError as stopped:
            assert str(archive) in str(stopped)
        spent.append(client.cost_usd)
    assert sum(spent) <= budget, f"runs spent {spent} of one budget of {budget}"
    assert spent[0] > 0 and spent[2] == 0


def test_the_estimate_before_sending_is_an_upper_bound(tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "test-key")
    long_notes = [
        ChatRequest(
            model="gpt-4o-mini", messages=(("user", f"note {i}: " + "stable vital signs. " * 200),), max_tokens=64
        )
        for i in range(12)
    ]
    budget = 0.01
    with OpenAIServer(chars_per_token=2) as dense:  # bills twice the tokens of 4 characters per token
        client = LLMClient(
            live_settings(dense, tmp_path / "a.jsonl", prices_per_million=PRICES, budget_usd=budget, max_concurrency=4)
        )
        with pytest.raises(BudgetExceededError):
            client.run(long_notes)
    assert 0 < client.cost_usd <= budget


@pytest.mark.parametrize("stage", ["instructions", "judge"])
def test_an_unpriced_model_with_a_budget_is_refused_before_any_request(server, tmp_path, stage):
    config = workflow_config.load("demo/config.yaml", require_data=False)
    config["llm"].update(
        backend="openai",
        base_url=server.url,
        api_key_env=KEY_ENV,
        approved_endpoints=[server.url],
        archive=str(tmp_path / "a.jsonl"),
        prices_per_million=PRICES,
        model="gpt-4o-mini",
        budget_usd=1.0,
    )
    config["judge"].update(backend="llm", model="judge-without-price", archive=str(tmp_path / "j.jsonl"))
    if stage == "instructions":
        config["llm"]["model"] = "model-without-price"
    with pytest.raises(ValueError, match="without-price.*llm.prices_per_million"):
        client = (
            LLMClient(LLMSettings.from_config(config["llm"])) if stage == "instructions" else judge_client(config, {})
        )
        client.run(requests(1))
    assert server.requests == []


def test_the_paper_config_prices_every_model_it_budgets():
    config = workflow_config.load("config.yaml", require_data=False)
    assert config["llm"]["budget_usd"] is not None
    assert {config["llm"]["model"], config["judge"]["model"]} <= set(config["llm"]["prices_per_million"])


# -- a server that lies about what it billed ------------------------------------------------------
def _worst(request) -> float:
    """The request's worst case in dollars at PRICES (one dollar a million tokens)."""
    return sum(request.worst_case_usage().values()) / 1e6


def _without_usage(reply: dict) -> dict:
    return {k: v for k, v in reply.items() if k != "usage"}


def _usage(**counts):
    return lambda reply: {**reply, "usage": counts}


@pytest.mark.parametrize(
    "reply",
    [_without_usage, lambda reply: {**reply, "usage": None}, _usage(prompt_tokens=3)],
    ids=["no usage", "usage null", "no completion count"],
)
def test_a_reply_without_usable_usage_is_charged_at_its_worst_case(server, tmp_path, reply):
    server.add_fault("reply", times=None, body=reply)
    archive, batch = tmp_path / "a.jsonl", requests(6)
    worst = _worst(batch[0])  # the six prompts are the same size
    client = LLMClient(
        live_settings(server, archive, prices_per_million=PRICES, budget_usd=3.5 * worst, max_concurrency=1)
    )
    with pytest.raises(BudgetExceededError):
        client.run(batch)
    assert len(server.chat_requests()) == 3 and client.cost_usd == pytest.approx(3 * worst)
    assert client.stats["usage"]["billed_responses"] == 3 and client.counts["billed_at_worst_case"] == 3
    rerun = LLMClient(live_settings(server, archive, prices_per_million=PRICES, budget_usd=3.5 * worst))
    assert rerun.spent_before_usd == pytest.approx(3 * worst), "the archive keeps what was charged"


@pytest.mark.parametrize(
    "usage",
    [
        {"prompt_tokens": -5000, "completion_tokens": 10},
        {"prompt_tokens": 10, "completion_tokens": -1},
        {"prompt_tokens": 10.5, "completion_tokens": 10},
        {"prompt_tokens": "10", "completion_tokens": 10},
        {"prompt_tokens": True, "completion_tokens": 10},
        {"prompt_tokens": 10**12, "completion_tokens": 10},
        {"prompt_tokens": 10, "completion_tokens": 65},  # past max_tokens (64)
        "prompt_tokens=10",
        [10, 10],
    ],
    ids=["negative", "negative output", "fraction", "text count", "bool", "absurd", "past max_tokens", "text", "list"],
)
def test_negative_or_absurd_usage_is_a_malformed_reply_charged_at_the_worst_case(server, tmp_path, usage):
    server.add_fault("reply", times=None, body=lambda reply: {**reply, "usage": usage})
    batch = requests(4)
    worst = _worst(batch[0])
    client = LLMClient(
        live_settings(
            server,
            tmp_path / "a.jsonl",
            prices_per_million=PRICES,
            budget_usd=5.5 * worst,
            max_concurrency=1,
            max_attempts=3,
        )
    )
    with pytest.raises(BudgetExceededError):
        client.run(batch)
    sent = len(server.chat_requests())
    assert sent == 5 and client.stats["retries"]["malformed"] == 5, "each lie refused, none used"
    assert client.cost_usd == pytest.approx(5 * worst) and client.cost_usd <= 5.5 * worst
    assert client.stats["failures"]["malformed"] == 1 and client.stats["sent_ok"] == 0


def test_a_chat_templates_default_system_prompt_on_a_short_prompt_is_honest_usage(server, tmp_path):
    # What transformers serve reports for "Hi" to SmolLM2-135M-Instruct: its template adds a
    # default system prompt, 30 tokens around 2 bytes (tests/test_local_server.py asks it for real).
    server.add_fault("reply", times=None, body=_usage(prompt_tokens=31, completion_tokens=4))
    short = ChatRequest(model="gpt-4o-mini", messages=(("user", "Hi"),), max_tokens=4)
    client = LLMClient(live_settings(server, tmp_path / "a.jsonl", prices_per_million=PRICES))
    [result] = client.run([short])
    assert result.ok and result.usage == {"prompt_tokens": 31, "completion_tokens": 4}
    assert client.stats["retries"]["malformed"] == 0 and client.counts["billed_at_worst_case"] == 0


@pytest.mark.parametrize("fault", ["stall", "trickle"])
def test_an_attempt_the_client_stops_waiting_for_is_charged_at_its_worst_case(server, tmp_path, fault):
    server.add_fault(fault, times=None, stall_s=0.6)
    archive, batch = tmp_path / "a.jsonl", requests(3)
    worst = _worst(batch[0])
    settings = dict(prices_per_million=PRICES, budget_usd=2.5 * worst, max_concurrency=1, timeout_s=0.3)
    client = LLMClient(live_settings(server, archive, **settings))
    with pytest.raises(BudgetExceededError):
        client.run(batch)
    assert len(server.chat_requests()) == 2 and client.stats["retries"]["timeout"] == 2
    assert client.cost_usd == pytest.approx(2 * worst)
    assert LLMClient(live_settings(server, archive, **settings)).spent_before_usd == pytest.approx(2 * worst)


@pytest.mark.parametrize("stage", ["instructions", "judge"])
def test_a_budget_without_an_archive_is_a_config_error(server, tmp_path, stage):
    config = workflow_config.load("demo/config.yaml", require_data=False)
    config["llm"].update(
        backend="openai",
        base_url=server.url,
        api_key_env=KEY_ENV,
        approved_endpoints=[server.url],
        archive=None if stage == "instructions" else str(tmp_path / "a.jsonl"),
        prices_per_million=PRICES,
        model="gpt-4o-mini",
        budget_usd=1.0,
    )
    config["judge"].update(
        backend="llm", model="gpt-4o-mini", archive=None if stage == "judge" else str(tmp_path / "j.jsonl")
    )
    with pytest.raises(ValueError, match=r"llm.budget_usd.*archive is null.*judge.archive") as refused:
        LLMClient(LLMSettings.from_config(config["llm"])) if stage == "instructions" else judge_client(config, {})
    assert "\n" not in str(refused.value) and server.requests == []


def _forge(archive, **result_fields):
    """Rewrite the archive's first record's result fields, as an edited or damaged file would."""
    lines = archive.read_text().splitlines()
    record = json.loads(lines[0])
    record["result"].update(result_fields)
    archive.write_text("\n".join([json.dumps(record), *lines[1:]]) + "\n")


def test_a_forged_negative_usage_in_the_archive_stops_the_run_naming_file_and_line(server, tmp_path):
    archive = tmp_path / "a.jsonl"
    LLMClient(live_settings(server, archive, prices_per_million=PRICES)).run(requests(2))
    _forge(archive, usage={"prompt_tokens": -(10**9), "completion_tokens": 0})
    with pytest.raises(ValueError, match=rf"^{archive}:1: its usage is not a whole, non-negative token count") as e:
        LLMClient(live_settings(server, archive, prices_per_million=PRICES, budget_usd=1.0))
    assert "\n" not in str(e.value) and len(server.chat_requests()) == 2


def test_an_archived_reply_without_usage_counts_at_its_worst_case(server, tmp_path):
    archive, batch = tmp_path / "a.jsonl", requests(2)
    LLMClient(live_settings(server, archive, prices_per_million=PRICES)).run(batch)
    _forge(archive, usage={})
    rerun = LLMClient(live_settings(server, archive, prices_per_million=PRICES, budget_usd=1.0))
    reported = json.loads(archive.read_text().splitlines()[1])["result"]["usage"]
    assert rerun.spent_before_usd == pytest.approx(_worst(batch[0]) + sum(reported.values()) / 1e6)
