"""One generator per archive: a stage left running by a killed Snakemake and a rerun on the same
archive. The rerun waits, naming the running one, instead of sending the same requests; the lock
is the archive file's, so a symlink, a hard link or another spelling of its path reaches it too."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from asclepius_r.llm.archive import hold_archive, let_go_of_archive
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


def _hold_then_report(path: str, done: str) -> None:
    """In a child process: hold the archive (waiting for it), then say so."""
    from asclepius_r.llm.archive import hold_archive

    hold_archive(path)
    Path(done).write_text("held")


@pytest.mark.parametrize("link", ["symlink", "hard link", "relative path"])
def test_one_lock_per_archive_file_whatever_path_reaches_it(tmp_path, link):
    archive, done = tmp_path / "archive.jsonl", tmp_path / "done"
    archive.write_text("")
    other = tmp_path / "elsewhere" / "same.jsonl"
    other.parent.mkdir()
    if link == "symlink":
        other.symlink_to(archive)
    elif link == "hard link":
        os.link(archive, other)
    else:
        other = Path(os.path.relpath(archive, Path.cwd()).replace("/", "/./"))
    identity = hold_archive(archive)
    child = multiprocessing.get_context("spawn").Process(target=_hold_then_report, args=(str(other), str(done)))
    child.start()
    try:
        child.join(timeout=2)
        assert child.is_alive() and not done.exists(), "a second generator got the archive"
    finally:
        let_go_of_archive(identity)
        child.join()
    assert child.exitcode == 0 and done.read_text() == "held"
