"""Config validation: defaults filled in, every error names its key, the paper config says
what to set, both shipped configs are valid, and a path pointed at the wrong file (a notes file)
is named without quoting what it holds."""

from __future__ import annotations

import copy
import gzip
import json
import subprocess
import sys

import pytest
import yaml

from asclepius_r import config as workflow_config
from asclepius_r.evaluate.generation import Decoding
from asclepius_r.evaluate.heldout import truncation_policy
from asclepius_r.instructions.tasks import load_seed_questions
from asclepius_r.notes.stage import NotePolicy
from asclepius_r.train.settings import training_settings
from tests.conftest import REPO, copy_workflow, run_snakemake
from tests.notes_support import note, write_noteevents

DEMO = yaml.safe_load((REPO / "demo/config.yaml").read_text())
PAPER = yaml.safe_load((REPO / "config.yaml").read_text())


def merged(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in override.items():
        out[key] = merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def test_demo_config_is_valid_and_gets_defaults():
    config = workflow_config.resolve(merged(PAPER, DEMO))
    assert config["notes"]["drop_iserror"] is True
    assert config["models"]["7B"]["base"] == "tiny"


def test_paper_config_says_what_to_set_and_that_the_demo_needs_no_data():
    with pytest.raises(workflow_config.ConfigError) as error:
        workflow_config.resolve(copy.deepcopy(PAPER))
    message = str(error.value)
    assert "noteevents" in message and "models.7B.base" in message and "models.13B.base" in message
    assert "make demo" in message


@pytest.mark.parametrize(
    "override, key",
    [
        ({"llm": {"backend": "chatgpt"}}, "llm.backend"),
        ({"notes": {"heldout_notes": -1}}, "notes.heldout_notes"),
        ({"notes": {"drop_iseror": True}}, "drop_iseror"),
        ({"pretrain": {"learning_rate": "fast"}}, "pretrain.learning_rate"),
        ({"models": {"7B": {"base": "tiny", "gpu": 8}}}, "models.7B"),
        ({"unknown_section": 1}, "unknown_section"),
        ({"finetune": {"truncation": "cut_end"}}, "finetune.truncation"),
        ({"evaluate": {"num_beams": 0}}, "evaluate.num_beams"),
        ({"evaluate": {"temperature": 0}}, "evaluate.temperature"),
    ],
)
def test_errors_name_the_key(override, key):
    with pytest.raises(workflow_config.ConfigError, match=key.replace(".", r"\.")):
        workflow_config.resolve(merged(merged(PAPER, DEMO), override))


def test_missing_required_key_is_named():
    config = merged(PAPER, DEMO)
    del config["models"]
    with pytest.raises(workflow_config.ConfigError, match="'models' is a required property"):
        workflow_config.resolve(config)


def test_per_size_override_with_a_wrong_key_is_named():
    config = workflow_config.resolve(merged(merged(PAPER, DEMO), {"models": {"13B": {"finetune": {"lr": 1}}}}))
    with pytest.raises(workflow_config.ConfigError, match=r"models\.13B\.finetune: unknown key\(s\) lr"):
        training_settings(config, "finetune", "13B")


def test_truncation_is_a_fine_tuning_setting_only():
    config = workflow_config.resolve(merged(merged(PAPER, DEMO), {"pretrain": {"truncation": "drop"}}))
    with pytest.raises(workflow_config.ConfigError, match=r"pretrain\.truncation: a finetune setting only"):
        training_settings(config, "pretrain", "7B")
    assert training_settings(config, "finetune", "7B")["truncation"] == "note_middle"
    config["finetune"]["truncation"] = "drop"
    assert truncation_policy(workflow_config.resolve(config)) == "drop"
    del config["finetune"]["truncation"]
    assert truncation_policy(workflow_config.resolve(config)) == "note_middle", "the schema's default"


def test_a_models_own_truncation_shapes_its_evaluation_prompts():
    config = workflow_config.resolve(
        merged(merged(PAPER, DEMO), {"models": {"13B": {"finetune": {"truncation": "note_tail"}}}})
    )
    config["evaluate"]["extra_models"] = {"Other": "/models/other"}
    policies = {model: truncation_policy(config, model) for model in workflow_config.evaluated_models(config)}
    assert policies == {
        "Base-7B": "note_middle",
        "Asclepius-R-7B-Pretrained-Only": "note_middle",
        "Asclepius-R-7B": "note_middle",
        "Base-13B": "note_tail",
        "Asclepius-R-13B-Pretrained-Only": "note_tail",
        "Asclepius-R-13B": "note_tail",
        "Other": "note_middle",
    }


def test_decoding_is_greedy_by_default_and_2023_beam_sampling_is_an_option():
    config = workflow_config.resolve(merged(PAPER, DEMO))
    assert Decoding.from_config(config["evaluate"]).generate_kwargs() == {
        "max_new_tokens": 32,
        "num_beams": 1,
        "do_sample": False,
    }
    of_2023 = {"evaluate": {"max_new_tokens": 400, "num_beams": 5, "do_sample": True, "temperature": 1.0}}
    config = workflow_config.resolve(merged(merged(PAPER, DEMO), of_2023))
    assert Decoding.from_config(config["evaluate"]).generate_kwargs() == {
        "max_new_tokens": 400,
        "num_beams": 5,
        "do_sample": True,
        "temperature": 1.0,
    }


def test_snakemake_refuses_a_bad_config_before_any_job(tmp_path):
    workdir = copy_workflow(tmp_path / "wf")
    result = run_snakemake(workdir, "-n", "--config", "seed=not-a-number", check=False)
    assert result.returncode != 0
    assert "config key seed" in result.stdout + result.stderr
    assert not (workdir / "results").exists()


def test_snakemake_with_the_paper_config_asks_for_data(tmp_path):
    workdir = copy_workflow(tmp_path / "wf")
    result = run_snakemake(workdir, "-n", demo=False, check=False)
    assert result.returncode != 0
    assert "noteevents" in result.stderr + result.stdout and "make demo" in result.stderr + result.stdout


def test_the_notes_stage_runs_alone_with_only_noteevents_set(tmp_path):
    """The paper config with only `noteevents` set: the notes stage needs no base model."""
    workdir = copy_workflow(tmp_path / "wf")
    noteevents = write_noteevents(tmp_path / "NOTEEVENTS.csv", [note(i, subject=i % 7) for i in range(1, 30)])
    (workdir / "small.yaml").write_text("notes: {heldout_notes: 3}\n")
    result = run_snakemake(
        workdir,
        "results/notes/stats.json",
        "--configfile",
        "small.yaml",
        "--config",
        f"noteevents={noteevents}",
        demo=False,
    )
    assert json.loads((workdir / "results/notes/stats.json").read_text())["kept"] == 29, result.stderr


def test_a_stage_asks_only_for_its_own_data(tmp_path):
    workdir = copy_workflow(tmp_path / "wf")
    result = run_snakemake(workdir, "-n", "results/models/Asclepius-R-13B-Pretrained-Only", demo=False, check=False)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "models.13B.base (the 13B base" in output or "noteevents (path" in output
    assert "models.7B.base (the 7B base" not in output  # named only as unset for other stages


def test_the_notes_stage_has_its_own_command_line(tmp_path):
    noteevents = write_noteevents(tmp_path / "NOTEEVENTS.csv", [note(i, subject=i % 7) for i in range(1, 30)])
    (tmp_path / "small.yaml").write_text("notes: {heldout_notes: 3}\n")
    command = [sys.executable, "-m", "asclepius_r.notes.stage", "--config", str(REPO / "config.yaml")]
    missing = subprocess.run(command, capture_output=True, text=True)
    assert missing.returncode == 2 and "noteevents (path" in missing.stderr
    command += ["--config", str(tmp_path / "small.yaml"), "--noteevents", str(noteevents), "--out", str(tmp_path / "n")]
    subprocess.run(command, check=True, capture_output=True)
    assert json.loads((tmp_path / "n/stats.json").read_text())["kept_heldout"] >= 3


NOTE_LINE = "Admission Date: [**2151-7-16**] Patient Okapi-Marker seen for chest pain."
DATA_FILES = {
    "NOTEEVENTS": (
        "ROW_ID,SUBJECT_ID,HADM_ID,CHARTDATE,CHARTTIME,STORETIME,CATEGORY,DESCRIPTION,CGID,ISERROR,TEXT\n"
        f'1,2,3,2151-7-20,,,Discharge summary,Report,,,"{NOTE_LINE}\n{NOTE_LINE}"\n'
    ).encode(),
    "a note alone": f"{NOTE_LINE}\n".encode(),
    "ROW_IDs, then a note": f"12\n34\n{NOTE_LINE}\n".encode(),
    "gzip": gzip.compress(NOTE_LINE.encode()),
}


@pytest.mark.parametrize("data", DATA_FILES.values(), ids=DATA_FILES.keys())
def test_config_paths_pointed_at_a_data_file_never_quote_it(tmp_path, data):
    wrong = tmp_path / "data.csv"
    wrong.write_bytes(data)
    config = workflow_config.resolve(merged(DEMO, {"notes": {"exclude_row_ids": str(wrong)}}), require_data=False)
    with pytest.raises(ValueError, match="notes.exclude_row_ids") as excluded:
        NotePolicy.from_config(config["notes"])
    with pytest.raises(ValueError, match="data.csv") as seeds:
        load_seed_questions(wrong)
    for refused in (excluded, seeds):
        message = str(refused.value)
        assert str(wrong) in message and "\n" not in message
        assert not [quoted for quoted in ("Okapi", "Admission", "SUBJECT_ID", "CHARTDATE") if quoted in message]
