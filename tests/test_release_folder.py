"""The demo's release folder: PhysioNet layout, model cards, manifest, checksums, a workflow
archive without notes, and restoring it onto a fresh checkout without training again."""

from __future__ import annotations

import importlib.metadata
import json
import shutil
import subprocess
import tarfile

import pandas as pd
import pytest
import yaml

from asclepius_r.files import sha256_file
from asclepius_r.prompts import RELEASED_TEMPLATE
from asclepius_r.release.folder import LICENSE, ReleaseError, restore, verify_sha256sums
from tests.conftest import copy_workflow, run_snakemake

pytestmark = pytest.mark.slow

SIZES = ("7B", "13B")
CHECKPOINTS = [f"Asclepius-R-{s}{suffix}" for s in SIZES for suffix in ("", "-Pretrained-Only")]


def front_matter(readme: str) -> dict:
    assert readme.startswith("---\n")
    return yaml.safe_load(readme.split("---\n", 2)[1])


def test_release_has_the_physionet_layout(demo_run):
    release = demo_run / "release"
    for name in CHECKPOINTS:
        assert (release / name / "config.json").exists() and list((release / name).glob("*.safetensors"))
        assert not (release / name / ".snakemake_timestamp").exists()
        assert not (release / name / "training_args.bin").exists(), "no pickles in the release"
        # Decoded as the demo's evaluation decoded (evaluate: 32 new tokens, greedy), not as a base samples.
        generation = json.loads((release / name / "generation_config.json").read_text())
        assert (generation["max_new_tokens"], generation.get("num_beams", 1), generation.get("do_sample", False)) == (
            32,
            1,
            False,
        )
        assert "temperature" not in generation and "top_p" not in generation
    for name in (
        "README.md",
        "mimiciii_discharge.csv",
        "heldout_row_ids.txt",
        "llm_archive/instructions.jsonl",
        "llm_archive/judge.jsonl",
        "evaluation/summary.json",
        "evaluation/scores_per_task.tsv",
        "manifest.json",
        "SHA256SUMS",
        "workflow/asclepius-r-workflow.tar.gz",
    ):
        assert (release / name).is_file(), name
    assert (release / "heldout_row_ids.txt").read_bytes() == (
        demo_run / "results/notes/heldout_row_ids.txt"
    ).read_bytes()
    assert "sha256sum -c SHA256SUMS" in (release / "README.md").read_text()
    assert all(p.stat().st_mode & 0o004 for p in release.rglob("*")), "everything readable for the upload"


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_model_cards(demo_run, name):
    card = (demo_run / "release" / name / "README.md").read_text()
    meta = front_matter(card)
    assert meta["license_name"] == LICENSE == "PhysioNet Credentialed Health Data License 1.5.0"
    assert meta["prompt_template"] == RELEASED_TEMPLATE, "the template must survive YAML byte for byte"
    assert meta["library_name"] == "transformers" and meta["datasets"]
    config = yaml.safe_load((demo_run / "demo/config.yaml").read_text())
    if name.endswith("-Pretrained-Only"):
        assert (
            meta["base_model"].startswith(
                "a tiny random model built by the workflow (demo; LlamaForCausalLM, SentencePiece"
            )
            and meta["training_stage"] == "pretrain"
        )
        assert meta["hyperparameters"]["learning_rate"] == config["pretrain"]["learning_rate"]
    else:
        assert meta["base_model"] == f"{name}-Pretrained-Only" and meta["training_stage"] == "finetune"
        assert meta["hyperparameters"]["epochs"] == config["finetune"]["epochs"]


def test_manifest_records_versions_commit_config_and_input_hashes(demo_run):
    manifest = json.loads((demo_run / "release/manifest.json").read_text())
    assert manifest["packages"]["snakemake"] == importlib.metadata.version("snakemake")
    assert manifest["packages"]["torch"].startswith(importlib.metadata.version("torch").split("+")[0])
    assert "commit" in manifest["git"]
    assert manifest["config"]["judge"]["backend"] == "heuristic"
    assert manifest["input_sha256"]["noteevents"] == {
        "NOTEEVENTS.csv": sha256_file(demo_run / "results/demo/NOTEEVENTS.csv")
    }
    assert manifest["input_sha256"]["base_model_7B"]["tokenizer.model"] == sha256_file(
        demo_run / "results/base_models/7B/tokenizer.model"
    )


def test_sha256sums_pass_and_catch_a_changed_file(demo_run, tmp_path):
    check = subprocess.run(
        ["sha256sum", "--strict", "-c", "SHA256SUMS"], cwd=demo_run / "release", capture_output=True, text=True
    )
    assert check.returncode == 0, check.stdout + check.stderr
    listed = {line.split("  ", 1)[1] for line in (demo_run / "release/SHA256SUMS").read_text().splitlines()}
    on_disk = {
        p.relative_to(demo_run / "release").as_posix()
        for p in (demo_run / "release").rglob("*")
        if p.is_file() and p.name not in ("SHA256SUMS", ".snakemake_timestamp")
    }
    assert listed == on_disk, "every file, and only those (besides Snakemake's own marker), has a checksum"
    copy = shutil.copytree(demo_run / "release", tmp_path / "release")
    with open(copy / "heldout_row_ids.txt", "a") as ids:
        ids.write("99999\n")
    assert subprocess.run(["sha256sum", "--quiet", "-c", "SHA256SUMS"], cwd=copy, capture_output=True).returncode != 0
    with pytest.raises(ReleaseError, match="heldout_row_ids.txt"):
        verify_sha256sums(copy)


def test_workflow_archive_holds_no_note_text(demo_run):
    notes = pd.concat(
        [pd.read_parquet(demo_run / f"results/notes/{split}.parquet") for split in ("discharge", "heldout")]
    )
    snippets = [text[len(text) // 2 : len(text) // 2 + 60].encode() for text in notes.TEXT]
    with tarfile.open(demo_run / "release/workflow/asclepius-r-workflow.tar.gz") as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
    assert "asclepius-r-workflow/Snakefile" in members and "asclepius-r-workflow/envs/llm.yaml" in members
    assert not [n for n in members if "NOTEEVENTS" in n or "/results/" in n]
    leaks = [name for name, data in members.items() for snippet in snippets if snippet in data]
    assert leaks == [], f"note text in {sorted(set(leaks))}"


def planned_jobs(workdir) -> set[str]:
    """The rules a plain run would execute now, from Snakemake's dry-run job table."""
    result = run_snakemake(workdir, "--dry-run", "--quiet", "rules")
    jobs = set()
    for line in result.stdout.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit() and parts[0] not in ("job", "total"):
            jobs.add(parts[0])
    return jobs


def test_restoring_a_release_on_a_fresh_checkout_does_not_train_again(demo_run, tmp_path):
    fresh = copy_workflow(tmp_path / "fresh")
    placed = restore(demo_run / "release", fresh)
    assert f"{fresh.as_posix()}/results/models/Asclepius-R-13B" in placed
    # The commands README.md documents: rebuild the cheap stages before training, then mark
    # the restored checkpoints as up to date.
    run_snakemake(fresh, "--omit-from", "pretrain")
    assert {"pretrain", "finetune"} <= planned_jobs(fresh), "without --touch the old timestamps look outdated"
    run_snakemake(fresh, "--touch", "--until", "finetune")
    planned = planned_jobs(fresh)
    assert not planned & {"pretrain", "finetune", "build_tiny_llama", "filter_notes", "generate_instructions"}
    assert "release" in planned
    restored = fresh / "results/mimiciii_discharge.csv"
    assert restored.read_bytes() == (demo_run / "release/mimiciii_discharge.csv").read_bytes(), (
        "replaying the archive re-derives the released dataset byte for byte"
    )
