"""The notes stage as the workflow runs it: `snakemake results/notes/discharge.parquet --config
noteevents=PATH` in a scratch copy keeps exactly the rows the policies say, and a bad file
fails the job with one message naming the file and line in its log (no traceback) and no outputs left."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from support.default_settings import note_policy
from support.synthetic_notes import main as synthesize

from .conftest import copy_workflow, run_snakemake
from .notes_support import expected_kept

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def workflow(tmp_path_factory) -> Path:
    return copy_workflow(tmp_path_factory.mktemp("notes-workflow") / "workflow")


def _config(workflow: Path, tmp_path: Path, **notes) -> Path:
    """demo/config.yaml with the given `notes` policies: the demo's models, so no real data is needed."""
    config = yaml.safe_load((workflow / "demo/config.yaml").read_text())
    config["notes"] = {**config.get("notes", {}), **notes}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _run_notes_stage(workflow: Path, config: Path, noteevents: Path, check: bool = True):
    """The notes stage alone through the Snakemake CLI, on `noteevents`."""
    return run_snakemake(
        workflow,
        "--configfile",
        str(config),
        "--config",
        f"noteevents={noteevents}",
        "--",
        "results/notes/discharge.parquet",
        demo=False,
        check=check,
    )


def test_workflow_keeps_exactly_what_the_policies_say(workflow, tmp_path):
    noteevents = tmp_path / "NOTEEVENTS.csv.gz"
    synthesize([str(noteevents), "--rows", "4000", "--seed", "21", "--gzip"])
    excluded = tmp_path / "exclude.txt"
    excluded.write_text("".join(f"{i}\n" for i in range(1, 4000, 9)))
    config = _config(
        workflow, tmp_path, keep_addenda=False, drop_iserror=False, exclude_row_ids=str(excluded), heldout_notes=12
    )
    _run_notes_stage(workflow, config, noteevents)
    out = workflow / "results/notes"
    train, heldout = (pq.read_table(out / f"{name}.parquet").to_pylist() for name in ("discharge", "heldout"))
    policy = note_policy(
        keep_addenda=False, drop_iserror=False, exclude_row_ids=frozenset(int(i) for i in excluded.read_text().split())
    )
    assert sorted((r["ROW_ID"], r["TEXT"]) for r in train + heldout) == sorted(expected_kept(noteevents, policy))
    assert len(heldout) >= 12 and not {r["SUBJECT_ID"] for r in train} & {r["SUBJECT_ID"] for r in heldout}
    stats = json.loads((out / "stats.json").read_text())
    assert stats["rows_read"] == 4000 and stats["kept"] + sum(stats["dropped"].values()) == 4000
    assert stats["dropped"]["iserror"] == 0 and stats["dropped"]["addendum"] > 0 and stats["dropped"]["excluded"] > 0


def test_workflow_job_fails_cleanly_on_a_truncated_file(workflow, tmp_path):
    noteevents = tmp_path / "NOTEEVENTS.csv"
    synthesize([str(noteevents), "--rows", "500", "--seed", "2"])
    data = noteevents.read_bytes()
    noteevents.write_bytes(data[: data.rindex(b'"') - 5])  # cut inside the last row's TEXT
    config = _config(workflow, tmp_path, heldout_notes=2)
    result = _run_notes_stage(workflow, config, noteevents, check=False)
    assert result.returncode != 0
    log = (workflow / "logs/notes/filter_notes.log").read_text()
    errors = [line for line in log.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and f"{noteevents}: line " in errors[0] and "never closed" in errors[0]
    assert "Traceback" not in log, "an expected error ends the rule with its message, not a traceback"
    out = workflow / "results/notes"
    assert not out.exists() or not list(out.iterdir()), "no output or temporary file may be left behind"
