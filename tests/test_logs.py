"""How entry points end on an error: an expected one (a UserError) with its message as one log line
and exit status 1, anything else with its traceback, once. The Snakemake side is in test_notes_workflow."""

from __future__ import annotations

import subprocess
import sys

import pandas as pd

from support.train_fixtures import build_fixture_data, launch_command, launch_env, write_run
from tests.conftest import REPO


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True)


def test_a_cli_ends_an_expected_error_with_one_message_and_no_traceback(tmp_path):
    result = _run("-m", "asclepius_r.release.folder", "verify", str(tmp_path))
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].endswith(
        f"ERROR asclepius_r: {tmp_path}/SHA256SUMS is missing: not a release folder"
    )
    assert "Traceback" not in result.stderr


def test_an_unexpected_error_keeps_its_traceback_in_the_log(tmp_path):
    log = tmp_path / "rule.log"
    code = f"from asclepius_r.logs import setup_logging; setup_logging({str(log)!r}); 1 / 0"
    result = _run("-c", code)
    assert result.returncode == 1
    text = log.read_text()
    assert text.startswith("Traceback (most recent call last):") and text.rstrip().endswith(
        "ZeroDivisionError: division by zero"
    )


def test_a_failed_training_process_leaves_its_own_error_and_one_launcher_line(tmp_path):
    data = build_fixture_data(tmp_path)
    pd.read_csv(data["sft"]).drop(columns="answer").to_csv(data["sft"], index=False)
    run_file = write_run(tmp_path, "finetune", data)
    result = subprocess.run(launch_command("finetune", run_file), env=launch_env(), capture_output=True, text=True)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr, "a bad input file is one message, in the child and the launcher"
    assert "ERROR asclepius_r: " in result.stderr and "missing column(s) ['answer']" in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert "ERROR asclepius_r: finetune for " in last and "exited with status 1" in last
