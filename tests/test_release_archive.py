"""The workflow archive: code, envs and config from an allow-list, never NOTEEVENTS, note text or
any MIMIC table (by its header, whatever its placeholders look like), even when NOTEEVENTS.csv
(and results/) sit inside the working directory; and no URL credentials in the config copies."""

from __future__ import annotations

import gzip
import json
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from asclepius_r.files import sha256_file
from asclepius_r.release.folder import ReleaseError, build_workflow_archive, manifest
from tests.conftest import copy_workflow

MARKER = "Zebrafish-Syndrome-Marker"
NOTE = f"Admission Date:  [**2151-7-16**]\nSeen at [**Hospital 1234**] for {MARKER}.\n"
NOTEEVENTS = (
    f"ROW_ID,SUBJECT_ID,HADM_ID,CHARTDATE,CHARTTIME,STORETIME,CATEGORY,DESCRIPTION,CGID,ISERROR,TEXT\n"
    f'1,2,3,2151-7-20,,,Discharge summary,Report,,,"{NOTE}"\n'
)


@pytest.fixture
def checkout(tmp_path):
    """A workflow checkout with patient data lying where users put it: in the working directory."""
    root = copy_workflow(tmp_path / "workflow")
    (root / "NOTEEVENTS.csv").write_text(NOTEEVENTS)
    (root / "results/notes").mkdir(parents=True)
    (root / "results/notes/discharge.parquet").write_text(NOTE)
    (root / "results/mimiciii_discharge.csv").write_text(f'note,question,answer,task\n"{NOTE}",q,a,t\n')
    return root


def archive_members(path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}


def test_archive_holds_code_envs_and_config_but_no_data(checkout, tmp_path):
    config = {"noteevents": str(checkout / "NOTEEVENTS.csv"), "seed": 42}
    out = tmp_path / "workflow.tar.gz"
    build_workflow_archive(out, checkout, config, forbidden=[checkout / "NOTEEVENTS.csv"])
    members = archive_members(out)
    names = {name.removeprefix("asclepius-r-workflow/") for name in members}
    assert {
        "Snakefile",
        "config.yaml",
        "demo/config.yaml",
        "rules/common.smk",
        "rules/release.smk",
        "scripts/release.py",
        "asclepius_r/release/folder.py",
        "envs/train.yaml",
        "requirements.lock",
        "release-config.yaml",
    } <= names
    assert not [
        n
        for n in names
        if n.startswith(("results/", "release/", "logs/", ".snakemake/", "demo/responses", "demo/discharge_summaries"))
        or "NOTEEVENTS" in n
    ]
    assert not [n for n, data in members.items() if MARKER.encode() in data], "note text leaked into the archive"
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]
    with tarfile.open(out) as tar:
        links = {m.name: m.linkname for m in tar.getmembers() if m.issym()}
    if (checkout / "scripts/asclepius_r").is_symlink():
        assert links == {"asclepius-r-workflow/scripts/asclepius_r": "../asclepius_r"}, "links stay links"


def test_links_out_of_the_checkout_are_refused(checkout, tmp_path):
    (tmp_path / "elsewhere.csv").write_text("plain\n")
    (checkout / "envs" / "linked.yaml").symlink_to(tmp_path / "elsewhere.csv")
    with pytest.raises(ReleaseError, match="links outside"):
        build_workflow_archive(tmp_path / "w.tar.gz", checkout, {"seed": 42}, forbidden=[])


def test_archive_is_byte_reproducible(checkout, tmp_path):
    for name in ("a.tar.gz", "b.tar.gz"):
        build_workflow_archive(tmp_path / name, checkout, {"seed": 42}, forbidden=[])
    assert sha256_file(tmp_path / "a.tar.gz") == sha256_file(tmp_path / "b.tar.gz")


@pytest.mark.parametrize(
    "planted",
    [
        "rules/NOTEEVENTS.csv",
        "scripts/noteevents.csv.gz",
        "asclepius_r/instructions/data/cohort.txt",
        "envs/extra.yaml",
    ],
)
def test_note_data_inside_source_folders_is_refused(checkout, tmp_path, planted):
    (checkout / planted).write_text(NOTEEVENTS if planted.endswith(("csv", "gz")) else NOTE)
    out = tmp_path / "workflow.tar.gz"
    with pytest.raises(ReleaseError, match=planted.replace(".", r"\.")):
        build_workflow_archive(out, checkout, {"seed": 42}, forbidden=[])


def test_the_configured_notes_file_is_refused_whatever_its_name(checkout, tmp_path):
    renamed = checkout / "report" / "extra_caption.rst"
    renamed.write_text("plain words only\n")
    with pytest.raises(ReleaseError, match="extra_caption.rst"):
        build_workflow_archive(tmp_path / "w.tar.gz", checkout, {"seed": 42}, forbidden=[renamed])


@pytest.mark.parametrize(
    "planted", ["asclepius_r/instructions/data/cohort.bin", "report/figure_data", "envs/cache.yaml"]
)
@pytest.mark.parametrize("packing", ["zstd-parquet", "gzip", "zstd"])
def test_compressed_or_binary_note_data_is_refused_whatever_its_name(checkout, tmp_path, planted, packing):
    if packing == "zstd-parquet":
        # Enough notes that zstd compresses every page (a lone short value is stored as it is).
        notes = [NOTE.replace("1234", str(1000 + i)) for i in range(200)]
        table = pa.table({"ROW_ID": list(range(200)), "TEXT": notes})
        pq.write_table(table, checkout / planted, compression="zstd", write_statistics=False)
    elif packing == "gzip":
        (checkout / planted).write_bytes(gzip.compress(NOTEEVENTS.encode()))
    else:
        (checkout / planted).write_bytes(pa.compress(NOTEEVENTS.encode(), codec="zstd", asbytes=True))
    with pytest.raises(ReleaseError, match=planted):
        build_workflow_archive(tmp_path / "w.tar.gz", checkout, {"seed": 42}, forbidden=[])


def test_build_outputs_stay_out_of_the_archive(checkout, tmp_path):
    (checkout / "asclepius_r/_build").mkdir(exist_ok=True)
    (checkout / "asclepius_r/_build/extension-0123456789abcdef.so").write_bytes(b"\x7fELF\x02\x01\x01\0" * 64)
    build_workflow_archive(tmp_path / "w.tar.gz", checkout, {"seed": 42}, forbidden=[])
    members = archive_members(tmp_path / "w.tar.gz")
    assert not [n for n in members if "_build" in n or n.endswith(".so")]


MIMIC_TABLES = {
    "NOTEEVENTS quoted, placeholders without digits": (
        '"ROW_ID","SUBJECT_ID","HADM_ID","CHARTDATE","CHARTTIME","STORETIME","CATEGORY","DESCRIPTION","CGID",'
        '"ISERROR","TEXT"\n1,2,3,2151-7-20,,,"Discharge summary","Report",,,"Seen by Dr. [Known lastname] today"\n'
    ),
    "an ID-and-date extract": "SUBJECT_ID,CHARTDATE\n249,2151-7-20\n",
    "PATIENTS": '"ROW_ID","SUBJECT_ID","GENDER","DOB","DOD","DOD_HOSP","DOD_SSN","EXPIRE_FLAG"\n234,249,"F",,,,,0\n',
    "D_ITEMS, a dictionary": "ROW_ID,ITEMID,LABEL,ABBREVIATION,DBSOURCE,LINKSTO\n1,2,x,y,carevue,chartevents\n",
    "lower case, tab separated": "subject_id\thadm_id\tcharttime\n249\t100001\t2151-07-20\n",
    "a pandas index column": ",SUBJECT_ID,HADM_ID\n0,249,100001\n",
    "semicolons, BOM and CRLF": "\ufeffICUSTAY_ID;INTIME\r\n200001;2151-07-20\r\n",
    "pipes inside YAML": "rows: |\n  ROW_ID|CGID|LABEL\n  1|2|RN\n",
    "a one-column extract": "HADM_ID\n100001\n100002\n",
    "a placeholder without a number": "Follow up with Dr. [**Last Name (NamePattern1) **] in clinic.\n",
}


@pytest.mark.parametrize("table", MIMIC_TABLES.values(), ids=MIMIC_TABLES.keys())
@pytest.mark.parametrize("planted", ["envs/extra.yaml", "report/caption.rst"])
def test_mimic_tables_are_refused_by_their_header_whatever_their_placeholders(checkout, tmp_path, table, planted):
    (checkout / planted).write_text(table)
    with pytest.raises(ReleaseError, match=planted.replace(".", r"\.")):
        build_workflow_archive(tmp_path / "w.tar.gz", checkout, {"seed": 42}, forbidden=[])


def test_the_config_copies_hold_no_url_credentials(checkout, tmp_path):
    secrets = ("pr0xy-passw0rd", "k3y-in-the-url-1234")
    config = {
        "seed": 42,
        "llm": {
            "proxy": f"http://alice:{secrets[0]}@proxy.cluster:3128",
            "base_url": f"https://llm.example/v1?api-key={secrets[1]}",
            "approved_endpoints": [f"https://llm.example/v1?api-key={secrets[1]}"],
        },
    }
    build_workflow_archive(tmp_path / "w.tar.gz", checkout, config, forbidden=[])
    copy = archive_members(tmp_path / "w.tar.gz")["asclepius-r-workflow/release-config.yaml"].decode()
    listed = json.dumps(manifest(config, checkout, {})["config"])
    for text in (copy, listed):
        assert not [secret for secret in secrets if secret in text]
        assert "proxy.cluster:3128" in text and "llm.example/v1" in text  # the endpoints are still named
