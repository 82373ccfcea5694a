"""kill -9 in the middle of the instruction stage (run as `python -m asclepius_r.instructions.generate` in a
subprocess against the local server), then a rerun: no request is delivered twice (the server's
request log says so) and the final CSV is byte-identical to an uninterrupted run's."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from asclepius_r.files import read_jsonl
from support.openai_server import OpenAIServer
from tests.llm_fixtures import API_KEY, KEY_ENV
from tests.test_instructions_engine import synthetic_notes, write_notes

REPO = Path(__file__).resolve().parents[1]


def stage_command(work: Path, config: Path, tag: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "asclepius_r.instructions.generate",
        "--config",
        str(config),
        "--notes",
        str(work / "notes.parquet"),
        "--records",
        str(work / f"{tag}.jsonl"),
        "--stats",
        str(work / f"{tag}.stats.json"),
        "--dataset",
        str(work / f"{tag}.csv"),
        "--log",
        str(work / f"{tag}.log"),
    ]


def write_config(work: Path, server: OpenAIServer, archive: Path) -> Path:
    config = {
        "noteevents": None,
        "models": {"7B": {"base": "tiny"}},
        "seed": 42,
        "instructions": {"pool_lag": 8},
        "llm": {
            "backend": "openai",
            "model": "gpt-4o-mini",
            "base_url": server.url,
            "api_key_env": KEY_ENV,
            "approved_endpoints": [server.url],
            "archive": str(archive),
            "max_concurrency": 4,
            "requests_per_minute": 60000,
            "backoff_base_s": 0.02,
            "backoff_max_s": 0.1,
        },
    }
    path = work / f"config-{archive.stem}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.slow
def test_kill_9_mid_stage_then_rerun_sends_nothing_twice_and_gives_the_same_csv(tmp_path):
    env = {**os.environ, KEY_ENV: API_KEY, "PYTHONPATH": str(REPO)}
    write_notes(tmp_path / "notes.parquet", synthetic_notes(30))

    with OpenAIServer() as server:
        config = write_config(tmp_path, server, tmp_path / "reference-archive.jsonl")
        subprocess.run(stage_command(tmp_path, config, "reference"), env=env, check=True)

    archive = tmp_path / "archive.jsonl"
    with OpenAIServer() as server:
        config = write_config(tmp_path, server, archive)
        server.add_fault("server_error", times=3)
        server.hold(after=25)  # 22 answers and 3 errors of 60 requests, then held
        stage = subprocess.Popen(stage_command(tmp_path, config, "killed"), env=env)
        try:
            # kill once requests are held and everything answered so far is archived
            server.wait_for(
                lambda s: (
                    s.held() >= 1
                    and archive.exists()
                    and sum(1 for r in read_jsonl(archive) if r["result"]["status"] == "ok") == 22
                )
            )
        finally:
            stage.kill()
            stage.wait()
        assert stage.returncode == -9 and not (tmp_path / "killed.csv").exists()
        server.release(drop=True)
        delivered_before = set(server.delivered())
        subprocess.run(stage_command(tmp_path, config, "rerun"), env=env, check=True)

        rerun_sent = {r.identity for r in server.chat_requests() if r.received > 0} - delivered_before
        assert max(server.delivered().values()) == 1  # no request answered twice, across both runs
        assert len(server.delivered()) == 60 and len(rerun_sent) == 38

    assert (tmp_path / "rerun.csv").read_bytes() == (tmp_path / "reference.csv").read_bytes()
    assert read_jsonl(tmp_path / "rerun.jsonl") == read_jsonl(tmp_path / "reference.jsonl")
    rerun_stats = yaml.safe_load((tmp_path / "rerun.stats.json").read_text())
    assert rerun_stats["llm"]["archived"] == 22 and rerun_stats["llm"]["sent_ok"] == 38
    assert API_KEY not in (tmp_path / "rerun.log").read_text() + (tmp_path / "killed.log").read_text()
