"""The PHI guard against the environment: SDK variables, redirects and proxies cannot send a note
anywhere but the approved endpoint. A second local server plays the unapproved host."""

from __future__ import annotations

import logging

import pytest

from asclepius_r import config as workflow_config
from asclepius_r.evaluate.judge import judge_client
from asclepius_r.llm import LLMClient, LLMSettings, UnapprovedEndpointError
from asclepius_r.llm.guard import OPENAI_DEFAULT_BASE_URL
from support.openai_server import OpenAIServer
from tests.llm_fixtures import API_KEY, KEY_ENV, live_settings, requests, server  # noqa: F401 (fixture)


@pytest.fixture
def rogue():
    """The unapproved host: whatever reaches it is a leak."""
    with OpenAIServer() as running:
        yield running


def demo_config_on(url: str | None, approved: list[str], tmp_path) -> dict:
    config = workflow_config.load("demo/config.yaml", require_data=False)
    config["llm"].update(
        backend="openai",
        base_url=url,
        api_key_env=KEY_ENV,
        approved_endpoints=approved,
        archive=str(tmp_path / "a.jsonl"),
        max_attempts=1,
        timeout_s=2.0,
    )
    config["judge"].update(backend="llm", archive=str(tmp_path / "judge.jsonl"))
    return config


@pytest.mark.parametrize("stage", ["instructions", "judge"])
@pytest.mark.parametrize("variable", ["OPENAI_BASE_URL", "OPENAI_CUSTOM_HEADERS"])
def test_sdk_variables_cannot_redirect_notes(server, rogue, tmp_path, monkeypatch, stage, variable):
    monkeypatch.setenv("OPENAI_BASE_URL", rogue.url)
    if variable == "OPENAI_CUSTOM_HEADERS":  # the endpoint matches; headers alone are still refused
        monkeypatch.setenv("OPENAI_BASE_URL", OPENAI_DEFAULT_BASE_URL)
        monkeypatch.setenv(variable, "X-Forward-To: elsewhere")
    config = demo_config_on(None, [OPENAI_DEFAULT_BASE_URL], tmp_path)
    with pytest.raises(UnapprovedEndpointError, match=variable) as refused:
        client = (
            LLMClient(LLMSettings.from_config(config["llm"])) if stage == "instructions" else judge_client(config, {})
        )
        client.run(requests(1))
    assert rogue.url not in str(refused.value), "an environment value is never quoted"
    assert rogue.requests == []


def test_redirects_are_not_followed(server, rogue, tmp_path):
    server.add_fault("redirect", times=None, location=f"{rogue.url}/chat/completions")
    results = LLMClient(live_settings(server, tmp_path / "a.jsonl", max_attempts=2)).run(requests(2))
    assert rogue.requests == [], "the note was re-posted to the redirect target"
    assert all(r.status == "failed" and r.error.startswith("http_307") for r in results)


def test_environment_proxies_are_ignored(server, rogue, tmp_path, monkeypatch, caplog):
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.setenv(name, rogue.endpoint)
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    with caplog.at_level(logging.WARNING):
        results = LLMClient(live_settings(server, tmp_path / "a.jsonl")).run(requests(2))
    assert rogue.requests == [], "the proxy from the environment received the note"
    assert all(r.ok for r in results) and len(server.chat_requests()) == 2
    assert "HTTPS_PROXY" in caplog.text and "ignored" in caplog.text


def test_sdk_credential_variables_are_not_used_and_said_so(server, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-from-the-environment")
    with caplog.at_level(logging.INFO):
        LLMClient(live_settings(server, tmp_path / "a.jsonl")).run(requests(1))
    assert [r.authorization for r in server.chat_requests()] == [f"Bearer {API_KEY}"]
    assert "OPENAI_API_KEY set in the environment: not used" in caplog.text
    assert "sk-from-the-environment" not in caplog.text


def test_a_named_proxy_of_a_plain_http_endpoint_must_be_approved(server, rogue, tmp_path):
    settings = live_settings(server, tmp_path / "a.jsonl", proxy=rogue.endpoint, max_attempts=1)
    with pytest.raises(UnapprovedEndpointError, match="llm.proxy"):
        LLMClient(settings)
    settings.approved_endpoints.append(rogue.endpoint)
    LLMClient(settings).run(requests(1))
    assert [r.path for r in rogue.requests] == [f"{server.url}/chat/completions"], "the named proxy carries it"


@pytest.mark.parametrize("mode", ["online", "batch"])
def test_a_request_outside_the_approved_endpoint_is_refused_unsent(server, rogue, tmp_path, mode):
    client = LLMClient(live_settings(server, tmp_path / "a.jsonl", mode=mode))
    client.backend.client.base_url = rogue.url  # as if the SDK chose another host by itself
    with pytest.raises(UnapprovedEndpointError, match=str(rogue.port)):
        client.run(requests(1))
    assert rogue.requests == [] and server.requests == []


@pytest.mark.parametrize("pasted", ["sk-proj-Zq81vXk2Lm0pQ7rT5sW9yB3nC6dF4gH1", "3f2a9b7c1d4e5f60718293a4b5c6d7e8"])
def test_a_key_pasted_into_api_key_env_is_refused_without_echoing_it(server, tmp_path, pasted):
    with pytest.raises(ValueError, match="llm.api_key_env") as refused:
        LLMClient(live_settings(server, tmp_path / "a.jsonl", api_key_env=pasted))
    assert pasted not in str(refused.value) and pasted[:8] not in str(refused.value)
    assert server.requests == []


def test_refusals_name_the_endpoint_without_the_credentials_in_its_url(server, rogue, tmp_path):
    secret = "url-s3cret-0123456789"
    cases = [
        dict(base_url=f"{server.url}?api-key={secret}", approved_endpoints=[server.url]),
        dict(proxy=f"http://bob:{secret}@127.0.0.1:{rogue.port}"),  # plain http through an unapproved proxy
    ]
    for overrides in cases:
        with pytest.raises(UnapprovedEndpointError) as refused:
            LLMClient(live_settings(server, tmp_path / "a.jsonl", **overrides))
        assert secret not in str(refused.value) and "127.0.0.1" in str(refused.value)
    assert server.requests == [] and rogue.requests == []
