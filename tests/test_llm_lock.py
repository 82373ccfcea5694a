"""One generator per archive: a stage left running by a killed Snakemake and a rerun on the same
archive. The rerun waits, naming the running one, instead of sending the same requests."""

from __future__ import annotations

import os
import subprocess

import pytest
import yaml

from support.openai_server import OpenAIServer
from tests.llm_fixtures import API_KEY, KEY_ENV
from tests.test_instructions_engine import synthetic_notes, write_notes
from tests.test_instructions_kill import REPO, stage_command, write_config


@pytest.mark.slow
def test_a_second_generator_on_one_archive_waits_for_the_first(tmp_path):
    env = {**os.environ, KEY_ENV: API_KEY, "PYTHONPATH": str(REPO)}
    write_notes(tmp_path / "notes.parquet", synthetic_notes(8))
    with OpenAIServer() as server:
        config = write_config(tmp_path, server, tmp_path / "archive.jsonl")
        settings = yaml.safe_load(config.read_text())
        settings["llm"]["max_concurrency"] = 1  # one request in flight: the orphan stops at a known point
        config.write_text(yaml.safe_dump(settings))
        server.hold(after=5)
        orphan = subprocess.Popen(stage_command(tmp_path, config, "orphan"), env=env)
        rerun = None
        try:
            server.wait_for(lambda s: s.held() == 1)
            sent_by_orphan = len(server.chat_requests())
            rerun = subprocess.Popen(stage_command(tmp_path, config, "rerun"), env=env)
            rerun_log = tmp_path / "rerun.log"
            server.wait_for(
                lambda s: (
                    (rerun_log.exists() and "in use by pid" in rerun_log.read_text())
                    or len(s.chat_requests()) > sent_by_orphan
                )
            )
            assert len(server.chat_requests()) == sent_by_orphan, "the rerun sent while the orphan ran"
            assert f"in use by pid {orphan.pid} on " in rerun_log.read_text()
        finally:
            server.release()
            assert orphan.wait() == 0 and rerun is not None and rerun.wait() == 0
        assert max(server.delivered().values()) == 1, "two generators sent the same request"
        assert "is free; continuing" in rerun_log.read_text(), "the lock goes with its process"
        assert (tmp_path / "rerun.jsonl").read_bytes() == (tmp_path / "orphan.jsonl").read_bytes()
