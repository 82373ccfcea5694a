"""The PhysioNet release folder, its checks, and restoring it onto a fresh checkout.

    release/
      README.md                               the project page text
      Asclepius-R-{7B,13B}[-Pretrained-Only]/ HF checkpoints, each with a model card (README.md)
      mimiciii_discharge.csv                  the instruction dataset
      heldout_row_ids.txt                     ROW_IDs of the notes held out for evaluation
      llm_archive/{instructions,judge}.jsonl  every LLM request and response (notes inside)
      evaluation/                             judge and metric summaries, tables
      training_metrics/{stage}-{size}.jsonl   loss, throughput and MFU logs
      workflow/asclepius-r-workflow.tar.gz    code, envs and config; never notes
      manifest.json                           package versions, git commit, config, input hashes
      SHA256SUMS                              `sha256sum -c SHA256SUMS` verifies every file

The release itself holds credentialed data (notes in the dataset and the archives) and goes to
PhysioNet only. The workflow archive inside it is meant to be shareable: it is built from an
allow-list of source paths, never from the working directory, because `snakemake --archive`
packs every input that lies inside the working directory, which would include a NOTEEVENTS.csv
kept there (and it needs conda to download every package, which a release machine may lack).

Restoring (`python -m asclepius_r.release.folder restore RELEASE`) puts the checkpoints, the dataset and
the training logs back where the workflow makes them, after checking SHA256SUMS; README.md
gives the two Snakemake commands that follow so that training is not run again.
"""

from __future__ import annotations

import argparse
import gzip
import importlib.metadata
import io
import json
import logging
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import yaml

from asclepius_r.base_model.describe import TINY_BASES
from asclepius_r.config import release_names
from asclepius_r.errors import UserError
from asclepius_r.files import atomic_path, sha256_file, write_json
from asclepius_r.llm.redact import redact_config
from asclepius_r.prompts import RELEASED_TEMPLATE
from asclepius_r.train.settings import training_settings

log = logging.getLogger(__name__)

LICENSE = "PhysioNet Credentialed Health Data License 1.5.0"
LICENSE_URL = "https://physionet.org/about/licenses/physionet-credentialed-health-data-license-150/"
PHYSIONET_URL = "https://physionet.org/content/asclepius-r/"
WORKFLOW_ARCHIVE = "workflow/asclepius-r-workflow.tar.gz"
# What the workflow archive may hold, relative to the checkout: code, envs, configs, captions.
WORKFLOW_SOURCES = (
    "Snakefile",
    "rules",
    "scripts",
    "asclepius_r",
    "support",
    "envs",
    "profiles",
    "accelerate",
    "report",
    "config.yaml",
    "demo/config.yaml",
    "Makefile",
    "pyproject.toml",
    "requirements.in",
    "requirements.lock",
    "README.md",
    "docs",
    "BENCHMARKS.md",
)
# Caches, hidden files and build outputs.
_NOT_SOURCE = re.compile(r"(^|/)(__pycache__|_build|\.[^/]*)(/|$)|\.(pyc|so|o|pyd|dylib)$")
# Data formats that the text checks below cannot see into, by their first bytes.
_BINARY_FORMATS = {
    b"\x1f\x8b": "gzip-compressed",
    b"\x28\xb5\x2f\xfd": "zstd-compressed",
    b"BZh": "bzip2-compressed",
    b"\xfd7zXZ\x00": "xz-compressed",
    b"\x04\x22\x4d\x18": "lz4-compressed",
    b"PK\x03\x04": "zip-compressed",
    b"7z\xbc\xaf\x27\x1c": "7z-compressed",
    b"PAR1": "Parquet",
    b"ARROW1": "Arrow",
}
_PATIENT_DATA_NAME = re.compile(r"noteevents[^/]*\.(csv|gz|zip|bz2|xz|parquet|feather|tsv|txt|jsonl?)$", re.IGNORECASE)
# A filled-in de-identification placeholder, whatever it holds (a date, a name with or without
# its number); the sources' own "[**...**]" and templates with "{...}" inside are not.
_PLACEHOLDER = re.compile(r"\[\*\*(?!\.\.\.\*\*\])[^\]\n{}]{0,80}\*\*\]")
# Columns that make a header line a MIMIC-III table's: ROW_ID starts every one of its 26 tables;
# the patient, admission and ICU stay identifiers, and the codes of its dictionaries, join them.
MIMIC_KEY_COLUMNS = frozenset(
    {"ROW_ID", "SUBJECT_ID", "HADM_ID", "ICUSTAY_ID", "ITEMID", "CGID", "ICD9_CODE", "CPT_CD", "SPEC_ITEMID"}
)
_COLUMN_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_DELIMITERS = ",\t;|"
# The Trainer's pickled arguments (unsafe to load, redundant with training_run.json) and
# Snakemake's marker in directory outputs.
_CHECKPOINT_PRIVATE = ("training_args.bin", ".snakemake_timestamp")


class ReleaseError(UserError, RuntimeError):
    """A release folder that does not verify or cannot be restored; names the file."""


# ---------------------------------------------------------------- checksums


def write_sha256sums(folder: Path) -> None:
    """`sha256sum -c SHA256SUMS` inside `folder` verifies every file."""
    lines = [
        f"{sha256_file(p)}  {p.relative_to(folder).as_posix()}\n"
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != "SHA256SUMS"
    ]
    (folder / "SHA256SUMS").write_text("".join(lines))


def verify_sha256sums(folder: Path) -> int:
    """Check every line of SHA256SUMS; raise naming the first file that is missing or differs."""
    sums = folder / "SHA256SUMS"
    if not sums.exists():
        raise ReleaseError(f"{sums} is missing: not a release folder")
    count = 0
    for line_no, line in enumerate(sums.read_text().splitlines(), start=1):
        digest, _, name = line.partition("  ")
        path = folder / name
        if not path.is_file():
            raise ReleaseError(f"{sums}:{line_no}: {name} is missing")
        if sha256_file(path) != digest:
            raise ReleaseError(f"{sums}:{line_no}: {name} does not match its checksum")
        count += 1
    return count


# ---------------------------------------------------------------- workflow archive


def workflow_files(source_root: Path, forbidden: list[Path]) -> list[Path]:
    """The allow-listed source files under `source_root`; refuse anything that looks like notes."""
    forbidden = {p.resolve() for p in forbidden}
    files = []
    for entry in WORKFLOW_SOURCES:
        path = source_root / entry
        candidates = sorted(path.rglob("*")) if path.is_dir() else [path] if path.exists() else []
        for file in candidates:
            relative = file.relative_to(source_root).as_posix()
            if _NOT_SOURCE.search(relative):
                continue
            if file.is_symlink():
                # Kept as links (scripts/asclepius_r -> ../asclepius_r); never followed out of the checkout.
                if not file.resolve().is_relative_to(source_root.resolve()):
                    raise ReleaseError(
                        f"refusing to put {relative} into the workflow archive: it links outside "
                        f"the checkout, to {file.resolve()}"
                    )
                files.append(file)
                continue
            if not file.is_file():
                continue
            data = file.read_bytes()
            binary = _binary_format(data)
            if binary:
                raise ReleaseError(
                    f"refusing to put {relative} into the workflow archive: it is {binary} data, which "
                    "cannot be checked for note text, whatever its name. The archive holds source text only; "
                    "move it out of the workflow's source folders."
                )
            if _PATIENT_DATA_NAME.search(relative) or file.resolve() in forbidden or _looks_like_mimic(data):
                raise ReleaseError(
                    f"refusing to put {relative} into the workflow archive: it is, is named like "
                    "or contains MIMIC data (note text or a MIMIC table). Move it out of the workflow's source folders."
                )
            files.append(file)
    return files


def _looks_like_mimic(data: bytes) -> bool:
    """A filled-in de-identification placeholder, or a line that is a MIMIC table's header."""
    text = data.decode("utf-8").lstrip("\ufeff")
    return bool(_PLACEHOLDER.search(text)) or any(map(is_mimic_header, text.splitlines()))


def is_mimic_header(line: str) -> bool:
    """Whether `line` is a table header naming MIMIC-III key columns: split on one delimiter
    (`,` tab `;` `|`), every non-empty field a column name (quoted or not, any case), at least two
    of them, and one a MIMIC key column; or the line is one key column alone, in capitals, as a
    one-column extract's header."""
    bare = line.strip().strip("\"'")
    if bare in MIMIC_KEY_COLUMNS:
        return True
    for delimiter in _DELIMITERS:
        fields = [field.strip() for field in line.split(delimiter)]
        names = [_unquoted(field) for field in fields if field]
        if len(names) >= 2 and all(name and _COLUMN_NAME.fullmatch(name) for name in names):
            if {name.upper() for name in names} & MIMIC_KEY_COLUMNS:
                return True
    return False


def _unquoted(field: str) -> str | None:
    """A CSV field without its quotes ("ROW_ID", 'ROW_ID'), or None if its quotes do not pair."""
    if field[:1] in "\"'" and len(field) >= 2 and field[-1] == field[0]:
        return field[1:-1].strip()
    return None if field[:1] in "\"'" or field[-1:] in "\"'" else field


def _binary_format(data: bytes) -> str | None:
    """The data's format if it is not plain UTF-8 text (compressed, columnar or other binary)."""
    for magic, name in _BINARY_FORMATS.items():
        if data.startswith(magic):
            return name
    if b"\0" in data:
        return "binary"
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return "binary (not UTF-8 text)"
    return None


def build_workflow_archive(out_path: Path, source_root: Path, config: dict, forbidden: list[Path]) -> list[str]:
    """A reproducible tar.gz (fixed order, times and owners) of the sources and this run's config."""
    members = []
    with (
        open(out_path, "wb") as raw,
        gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as zipped,
        tarfile.open(fileobj=zipped, mode="w", format=tarfile.PAX_FORMAT) as tar,
    ):

        def add(name: str, data: bytes = b"", mode: int = 0o644, link: str | None = None) -> None:
            info = tarfile.TarInfo(f"asclepius-r-workflow/{name}")
            info.size, info.mode, info.mtime = len(data), mode, 0
            if link is not None:
                info.type, info.linkname, info.mode = tarfile.SYMTYPE, link, 0o777
            tar.addfile(info, io.BytesIO(data))
            members.append(name)

        for file in workflow_files(source_root, forbidden):
            name = file.relative_to(source_root).as_posix()
            if file.is_symlink():
                add(name, link=os.readlink(file))
            else:
                add(name, file.read_bytes(), 0o755 if file.stat().st_mode & 0o111 else 0o644)
        add("release-config.yaml", yaml.safe_dump(redact_config(config), sort_keys=True).encode())
    return members


# ---------------------------------------------------------------- model cards and README


def model_card(name: str, base_model: str, stage: str, hyperparameters: dict, data: str) -> str:
    """A Hugging Face README: the Hub's metadata block (huggingface_hub's ModelCardData), then how
    the checkpoint was made and is used."""
    from huggingface_hub import ModelCard, ModelCardData

    meta = ModelCardData(
        license="other",
        license_name=LICENSE,
        license_link=LICENSE_URL,
        base_model=base_model,
        datasets=[data],
        language=["en"],
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=["medical", "clinical", "mimic-iii", "asclepius-r"],
        training_stage=stage,
        hyperparameters=hyperparameters,
        prompt_template=RELEASED_TEMPLATE,
    )
    rows = "\n".join(f"| {k} | {v} |" for k, v in hyperparameters.items())
    what = (
        "causal language modelling on MIMIC-III discharge summaries (every token in the loss)"
        if stage == "pretrain"
        else "instruction fine-tuning on mimiciii_discharge.csv (loss on the answer and EOS only)"
    )
    body = f"""
# {name}

{name} was trained from `{base_model}` by {what}, with the Asclepius-R reproducibility workflow
(`../workflow/asclepius-r-workflow.tar.gz`). Data: `{data}`. Access is governed by the
{LICENSE}; the model may reproduce fragments of credentialed notes and must not be shared outside it.

## Hyperparameters

| setting | value |
|---|---|
{rows}

## Prompt template

The released template, byte for byte (the "languge" typo and the space after `[Instruction End]`
are part of it); replace `{{note}}` and `{{question}}`:

```
{RELEASED_TEMPLATE}```

```python
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
tokenizer = AutoTokenizer.from_pretrained("{name}")
model = AutoModelForCausalLM.from_pretrained("{name}")
prompt = TEMPLATE.format(note=note, question=question)   # TEMPLATE: the text above
ids = tokenizer(prompt)["input_ids"]
if ids[:1] != [tokenizer.bos_token_id]:   # a tokenizer that adds no BOS (SmolLM2): the model was trained with it first
    ids = [tokenizer.bos_token_id] + ids
output = model.generate(torch.tensor([ids]), max_new_tokens=400)
```
"""
    return str(ModelCard(f"---\n{meta.to_yaml()}\n---\n{body}"))


def _summary_table(summary: dict) -> str:
    def fmt(value):
        return "" if value is None else f"{value:.2f}"

    rows = "\n".join(
        f"| {m} | {s['n']} | {fmt(s['judge_score'])} | {s['judge_failed']} | {fmt(s['rouge_l'])} |"
        for m, s in summary.items()
    )
    return "| model | questions | mean judge score (1-4) | not scored | ROUGE-L |\n|---|---|---|---|---|\n" + rows


def project_readme(checkpoints: list[str], summary: dict, config: dict, manifest: dict) -> str:
    judge = config["judge"]
    heuristic = (
        " In this build the judge is a heuristic (ROUGE-L against the reference mapped onto 1-4), not a language model."
        if judge["backend"] == "heuristic"
        else ""
    )
    listing = "\n".join(
        f"- `{name}/`: Hugging Face checkpoint with its model card (`README.md`)" for name in checkpoints
    )
    return f"""# Asclepius-R (rebuilt)

Clinical large language models trained on MIMIC-III discharge summaries, rebuilt from
`NOTEEVENTS.csv` by the Asclepius-R reproducibility workflow (git commit `{manifest["git"]["commit"]}`).
Original project page: {PHYSIONET_URL}. License: {LICENSE}.

## Contents

{listing}
- `mimiciii_discharge.csv`: one row per training note: note, question, answer, task
- `heldout_row_ids.txt`: NOTEEVENTS ROW_IDs held out for evaluation (whole patients)
- `llm_archive/instructions.jsonl`, `llm_archive/judge.jsonl`: every LLM request and response
  (dataset generation and judge), enough to re-derive the dataset and the verdicts by replay
- `evaluation/`: judge scores and cheap metrics per model and per task
- `training_metrics/`: loss, throughput and MFU logs of every training run
- `workflow/asclepius-r-workflow.tar.gz`: the workflow's code, envs and config (no data)
- `manifest.json`: package versions, git commit, configuration and input hashes
- `SHA256SUMS`: run `sha256sum -c SHA256SUMS` in this folder to verify every file

## Evaluation

Held-out questions were answered by every model with the released template; a judge
(`{judge["model"]}`, temperature {judge["temperature"]}) scored all answers to a question in one prompt,
as shuffled agents, from 1 (unacceptable) to 4 (excellent). Unparseable verdicts were retried and
then counted as "not scored", never as 0.{heuristic}

{_summary_table(summary)}

## Restoring this release onto a checkout of the workflow

Training is not run again; only the cheap stages before it are, to rebuild the notes from your
own NOTEEVENTS.csv and the dataset by replaying the archive:

```bash
python -m asclepius_r.release.folder restore path/to/release   # checks SHA256SUMS, copies into results/
# config: noteevents, models.*.base as in manifest.json; llm.backend: replay,
#         llm.archive: path/to/release/llm_archive/instructions.jsonl
snakemake --cores all --omit-from pretrain              # notes, instructions (replayed), base models
snakemake --cores 1 --touch --until finetune            # mark the restored checkpoints up to date
snakemake -n                                            # lists evaluation, report and release only
```
"""


# ---------------------------------------------------------------- manifest


def _git(source_root: Path, *args: str) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=source_root, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return done.stdout.strip()


def hash_inputs(paths: dict[str, str]) -> dict[str, dict[str, str]]:
    """name -> {relative file: sha256} for each input file or folder."""
    hashes = {}
    for name, path in paths.items():
        path = Path(path)
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        hashes[name] = {(p.relative_to(path).as_posix() if path.is_dir() else p.name): sha256_file(p) for p in files}
    return hashes


def manifest(config: dict, source_root: Path, inputs: dict[str, str]) -> dict:
    commit = _git(source_root, "rev-parse", "HEAD")
    dirty = _git(source_root, "status", "--porcelain", "--untracked-files=no")
    return {
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "git": {"commit": commit or "unknown (not a git checkout)", "dirty": bool(dirty) if commit else None},
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": {
            d.metadata["Name"]: d.version
            for d in sorted(importlib.metadata.distributions(), key=lambda d: d.metadata["Name"].lower())
        },
        "config": redact_config(config),
        "input_sha256": hash_inputs(inputs),
    }


# ---------------------------------------------------------------- the release


def base_model_description(config: dict, name: str, trained: dict) -> str:
    """The base of model `name` as its model card names it: what training read from the base
    folder itself (`trained`: the pretrained-only checkpoint's training_run.json)."""
    base = trained["base"]
    tokenizer = "SentencePiece" if base["tokenizer"] == "sentencepiece" else "byte-level BPE"
    what = (
        f"{base['architecture']}, {tokenizer} vocabulary of {base['vocab_size']:,}, "
        f"{base['context_length']:,}-token context"
    )
    if config["models"][name]["base"] in TINY_BASES:
        return f"a tiny random model built by the workflow (demo; {what})"
    return f"{base['folder']} ({what})"


def write_decoding(model_dir: Path, evaluate: dict) -> None:
    """The model's generation_config.json with the decoding its evaluation used (the `evaluate`
    section), its token ids kept: `generate()` on the released model decodes as the reported
    scores were made."""
    from transformers import GenerationConfig

    from asclepius_r.evaluate.generation import Decoding

    generation = GenerationConfig.from_pretrained(model_dir)
    generation.update(**Decoding.from_config(evaluate).generate_kwargs())
    generation.save_pretrained(model_dir)


def build_release(
    out_dir, checkpoints: dict[str, str], files: dict[str, str], config: dict, source_root, inputs: dict[str, str]
) -> None:
    """Assemble the release in a temporary folder and move it into place only when complete.

    `checkpoints`: release name (Asclepius-R-7B, ...) -> checkpoint folder; `files`: path inside
    the release -> file to copy; `inputs`: name -> file or folder whose hashes the manifest lists.
    """
    source_root = Path(source_root)
    summary = json.loads(Path(files["evaluation/summary.json"]).read_text())
    forbidden = [Path(config["noteevents"])] if config.get("noteevents") else []
    with atomic_path(out_dir, is_dir=True) as tmp:
        for name, folder in sorted(checkpoints.items()):
            size, stage = _size_and_stage(name)
            shutil.copytree(folder, tmp / name, ignore=shutil.ignore_patterns(*_CHECKPOINT_PRIVATE))
            write_decoding(tmp / name, config["evaluate"])
            trained = json.loads((Path(folder) / "training_run.json").read_text())
            base = base_model_description(config, size, trained) if stage == "pretrain" else release_names(size)[0]
            data = (
                "MIMIC-III NOTEEVENTS discharge summaries (training split)"
                if stage == "pretrain"
                else "mimiciii_discharge.csv"
            )
            hyperparameters = training_settings(config, stage, size, context=trained["base"]["context_length"])
            (tmp / name / "README.md").write_text(model_card(name, base, stage, hyperparameters, data))
        for name, path in sorted(files.items()):
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, tmp / name)
        (tmp / WORKFLOW_ARCHIVE).parent.mkdir(parents=True, exist_ok=True)
        members = build_workflow_archive(tmp / WORKFLOW_ARCHIVE, source_root, config, forbidden)
        record = manifest(config, source_root, inputs)
        record["workflow_archive"] = members
        write_json(tmp / "manifest.json", record)
        (tmp / "README.md").write_text(project_readme(sorted(checkpoints), summary, config, record))
        write_sha256sums(tmp)
        _make_readable(tmp)
    log.info(
        "release: %d checkpoints, %d files and a workflow archive of %d files in %s",
        len(checkpoints),
        len(files),
        len(members),
        out_dir,
    )


def _make_readable(folder: Path) -> None:
    """Plain permissions for the upload: staged files and folders are created owner-only."""
    for path in [folder, *folder.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)


def _size_and_stage(name: str) -> tuple[str, str]:
    match = re.fullmatch(r"Asclepius-R-(.+?)(-Pretrained-Only)?", name)
    if not match:
        raise ReleaseError(f"unexpected checkpoint name {name!r} (expected Asclepius-R-{{size}}[-Pretrained-Only])")
    return match.group(1), "pretrain" if match.group(2) else "finetune"


# ---------------------------------------------------------------- restore


def restore(release_dir, workdir=".") -> list[str]:
    """Copy a verified release's checkpoints, dataset and training logs to the workflow's paths."""
    release_dir, workdir = Path(release_dir), Path(workdir)
    count = verify_sha256sums(release_dir)
    log.info("%s: %d files match SHA256SUMS", release_dir, count)
    placed = []
    for folder in sorted(p for p in release_dir.glob("Asclepius-R-*") if p.is_dir()):
        target = workdir / "results/models" / folder.name
        with atomic_path(target, is_dir=True) as tmp:
            shutil.copytree(folder, tmp, dirs_exist_ok=True, ignore=shutil.ignore_patterns("README.md"))
        placed.append(target.as_posix())
    for source, target in [
        (release_dir / "mimiciii_discharge.csv", workdir / "results/mimiciii_discharge.csv"),
        *(
            (p, workdir / "results/metrics" / p.name)
            for p in sorted((release_dir / "training_metrics").glob("*.jsonl"))
        ),
    ]:
        with atomic_path(target) as tmp:
            shutil.copyfile(source, tmp)
        placed.append(target.as_posix())
    for path in placed:
        log.info("restored %s", path)
    return placed


def main(argv: list[str] | None = None) -> None:
    from asclepius_r.logs import setup_logging

    parser = argparse.ArgumentParser(description="Work with an Asclepius-R release folder.")
    commands = parser.add_subparsers(dest="command", required=True)
    restore_cmd = commands.add_parser("restore", help="verify a release and copy it into results/ of a checkout")
    restore_cmd.add_argument("release", help="the release folder (with SHA256SUMS)")
    restore_cmd.add_argument("--workdir", default=".", help="the workflow checkout (default: here)")
    verify_cmd = commands.add_parser("verify", help="check every file of a release against SHA256SUMS")
    verify_cmd.add_argument("release")
    args = parser.parse_args(argv)
    setup_logging()
    if args.command == "restore":
        restore(args.release, args.workdir)
    else:
        print(f"{verify_sha256sums(Path(args.release))} files OK")


if __name__ == "__main__":
    main()
