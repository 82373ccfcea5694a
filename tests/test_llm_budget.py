"""The budget caps what an archive costs: across runs, for every model that has one, and against
a server that counts more tokens than four characters make."""

from __future__ import annotations

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
