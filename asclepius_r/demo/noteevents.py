"""Deterministic synthetic NOTEEVENTS.csv in the exact MIMIC-III schema.

The demo file holds the project's hand-written discharge summaries (demo/discharge_summaries,
`NN-slug.txt`, addenda `NN-addendum-to-MM.txt`) plus what the real file has around them: other
note categories with their exact spellings (trailing spaces included), an ISERROR row, an
exact-duplicate text, a near-miss category, embedded newlines and quotes, and MIMIC
de-identification placeholders. `--rows N` or `--gb X` scales the same mix to any size.

    python -m asclepius_r.demo.noteevents OUT.csv [--rows N | --gb X] [--gzip]
"""

from __future__ import annotations

import argparse
import gzip
import random
import re
from dataclasses import dataclass
from pathlib import Path

from ..noteevents import COLUMNS

DEMO_NOTES_DIR = Path(__file__).resolve().parents[2] / "demo" / "discharge_summaries"
DISCHARGE_ROW_ID_BASE = 50000  # note NN of the demo is ROW_ID 50000 + NN
SUBJECT_ID_BASE = 10000
_NAME = re.compile(r"^(\d{2})-(?:addendum-to-(\d{2})|.+)\.txt$")

# Real row counts per CATEGORY (reference/noteevents.md), exact spellings.
CATEGORY_MIX = {
    "Nursing/other": 822_497, "Radiology": 522_279, "Nursing": 223_556, "ECG": 209_051,
    "Physician ": 141_624, "Discharge summary": 59_652, "Echo": 45_794, "Respiratory ": 31_739,
    "Nutrition": 9_418, "General": 8_301, "Rehab Services": 5_431, "Social Work": 2_670,
    "Case Management ": 967, "Pharmacy": 103, "Consult": 98,
}

_OTHER_TEXT = {
    "Radiology": ("[**{date}**] {time} CHEST (PORTABLE AP)  Clip # [**Clip Number (Radiology) {n}**]\n"
                  "Reason: eval for infiltrate\n\nFINDINGS: {finding}\n\nIMPRESSION: {impression}\n"),
    "ECG": "Sinus rhythm at {rate}. {finding} Compared to the previous tracing of [**{date}**] no change.\n",
    "Echo": ("PATIENT/TEST INFORMATION:\nIndication: {finding}\nConclusions:\nThe left atrium is mildly dilated. "
             "LVEF {ef}%. {impression}\n"),
    "Nursing/other": ("NPN 7p-7a:\nNeuro: A+Ox3, follows commands.\nCV: HR {rate} SR, no ectopy.\n"
                      "Resp: LS clear, sats 96% on 2L NC.\nPt states \"{quote}\".\nPlan: cont to monitor.\n"),
    "Nursing": "Nursing Progress Note\n{finding}\nFamily in to visit, updated by RN. Will continue current plan.\n",
    "Physician ": ("Chief Complaint: {finding}\n24 Hour Events:\n- {impression}\nAssessment and Plan\n"
                   "Pt is a {age} y/o with {finding}, \"doing better\" per pt.\n"),
    "Respiratory ": "Respiratory Care:\nPt remains on {mode}, RR {rate}, sats 97%. BS coarse bilat. Plan to wean as tol.\n",
    "Nutrition": "Nutrition Assessment:\nPt NPO, on TF at {rate} ml/hr, goal 60 ml/hr. Wt [**Numeric Identifier {n}**] kg.\n",
    "General": "Family meeting held with [**First Name8 (NamePattern2) {n}**] regarding goals of care.\n",
    "Rehab Services": "Physical Therapy Evaluation:\nPt ambulated 50 ft with RW and min assist. {impression}\n",
    "Social Work": "SW note: met with pt and wife, \"we are managing\". Discussed supports at home, [**Location (un) {n}**].\n",
    "Case Management ": "CM: screening for rehab placement, referrals sent to [**Hospital {n}**].\n",
    "Pharmacy": "Pharmacy: vancomycin trough {rate}, dose adjusted to 1 g q12h.\n",
    "Consult": "Consult note: {finding}. Recommend {impression}\n",
}
_FINDINGS = ["mild cardiomegaly, no effusion", "new left lower lobe opacity", "hypotension, on pressors",
             "ST depressions in V4-V6", "worsening dyspnea, \"can't catch my breath\"", "fever to 101.2°F",
             "bibasilar atelectasis", "right IJ line tip in SVC"]
_IMPRESSIONS = ["No acute cardiopulmonary process.", "Possible early pneumonia; clinical correlation advised.",
                "Interval improvement.", "Continue diuresis, repeat film in AM.", "Small pericardial effusion."]
_QUOTES = ["I want to go home", "my chest hurts, \"like before\"", "when can I eat?", "I'm cold"]


@dataclass(frozen=True)
class DemoNote:
    number: int
    amends: int | None
    text: str

    @property
    def row_id(self) -> int:
        return DISCHARGE_ROW_ID_BASE + self.number

    @property
    def subject_id(self) -> int:
        return SUBJECT_ID_BASE + (self.amends or self.number)


def demo_row_id(note_name: str) -> int:
    """ROW_ID of a demo note from its file stem, such as '05-upper-gi-bleed'."""
    return DISCHARGE_ROW_ID_BASE + int(note_name[:2])


def load_demo_notes(notes_dir: Path = DEMO_NOTES_DIR) -> list[DemoNote]:
    notes = []
    for path in sorted(notes_dir.glob("*.txt")):
        match = _NAME.match(path.name)
        if not match:
            raise ValueError(f"{path}: demo note names look like NN-slug.txt or NN-addendum-to-MM.txt")
        text = path.read_text(encoding="utf-8").rstrip("\n")
        notes.append(DemoNote(int(match.group(1)), int(match.group(2)) if match.group(2) else None, text))
    if not notes:
        raise ValueError(f"{notes_dir}: no demo notes found")
    return notes


def _quote(value: str) -> str:
    return '"' + value.replace('"', '""') + '"'


def _row(row_id, subject, hadm, chartdate, charttime, storetime, category, description, cgid, iserror, text) -> str:
    fields = [str(row_id), str(subject), str(hadm) if hadm else "", chartdate,
              charttime, storetime, _quote(category), _quote(description), str(cgid) if cgid else "",
              iserror, _quote(text)]
    return ",".join(fields) + "\n"


def _date(rng: random.Random) -> str:
    return f"{rng.randint(2100, 2199)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"


def _other_row(rng: random.Random, row_id: int, category: str) -> str:
    date = _date(rng)
    text = _OTHER_TEXT[category].format(
        date=date, time=f"{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}", n=rng.randint(100, 9999),
        finding=rng.choice(_FINDINGS), impression=rng.choice(_IMPRESSIONS), rate=rng.randint(55, 120),
        ef=rng.randint(20, 65), quote=rng.choice(_QUOTES), age=rng.randint(25, 89),
        mode=rng.choice(["CPAP+PS 5/5", "AC 500x14", "2L NC"]))
    hadm = rng.randint(100000, 199999) if rng.random() > 0.1 else None  # some outpatient rows lack HADM_ID
    chartdate = date
    charttime = f"{date} {rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}:00"
    return _row(row_id, rng.randint(1, 99999), hadm, chartdate, charttime, charttime, category,
                "Report", rng.randint(14000, 21000), "", text)


def _discharge_row(note: DemoNote, rng: random.Random, row_id: int | None = None, iserror: str = "",
                   text: str | None = None, category: str = "Discharge summary") -> str:
    return _row(row_id or note.row_id, note.subject_id, 100000 + (note.amends or note.number),
                f"21{note.number:02d}-0{1 + note.number % 9}-1{note.number % 10}", "", "", category,
                "Addendum" if note.amends else "Report", None, iserror, text or note.text)


def demo_rows(notes: list[DemoNote], seed: int = 7) -> list[str]:
    """The demo's rows: every demo note once, the special cases, and ~3 other notes per discharge."""
    rng = random.Random(seed)
    categories = [c for c in CATEGORY_MIX if c != "Discharge summary"]
    other = [_other_row(rng, 1 + i, categories[i % len(categories)]) for i in range(3 * len(notes))]
    body = other + [_discharge_row(n, rng) for n in notes]
    rng.shuffle(body)
    first, second = notes[4], notes[6]
    special = [
        # A note a physician flagged as wrong: same patient, edited text.
        _discharge_row(first, rng, row_id=DISCHARGE_ROW_ID_BASE + 100, iserror="1",
                       text=first.text.replace("Discharge", "Dischrage", 1)),
        # The same text stored twice under another ROW_ID; it follows the original so the first is kept.
        _discharge_row(second, rng, row_id=DISCHARGE_ROW_ID_BASE + 101),
        # A category that is 'Discharge summary' but for case and a trailing space.
        _discharge_row(notes[0], rng, row_id=DISCHARGE_ROW_ID_BASE + 102, category="discharge summary ",
                       text="Addendum:\nPatient seen, \"stable\" for discharge.\n"),
    ]
    return body + special


def scaled_rows(notes: list[DemoNote], n_rows: int, seed: int = 7):
    """`n_rows` rows in the real category mix; discharge texts are the demo notes, varied."""
    rng = random.Random(seed)
    categories, weights = zip(*CATEGORY_MIX.items())
    for row_id in range(1, n_rows + 1):
        category = rng.choices(categories, weights)[0]
        if category != "Discharge summary":
            yield _other_row(rng, row_id, category)
            continue
        note = rng.choice(notes)
        # Distinct texts at scale: repeat sections a varying number of times, as long notes do.
        text = note.text + "".join(f"\n\nInterval note {k}: [**{_date(rng)}**] {rng.choice(_FINDINGS)}."
                                   for k in range(rng.randint(0, 6)))
        yield _row(row_id, rng.randint(1, 99999), rng.randint(100000, 199999), _date(rng), "", "",
                   category, "Addendum" if note.amends else "Report", None, "", text)


def write_noteevents(out: str | Path, rows, gzip_output: bool = False, max_bytes: int | None = None) -> int:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    opener = gzip.open if gzip_output else open
    written = 0
    with opener(out, "wt", encoding="utf-8", newline="") as csv_file:
        csv_file.write(",".join(f'"{c}"' for c in COLUMNS) + "\n")
        for row in rows:
            csv_file.write(row)
            written += len(row.encode("utf-8"))
            if max_bytes and written >= max_bytes:
                break
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--rows", type=int, help="rows to write, in the real category mix")
    size.add_argument("--gb", type=float, help="approximate size to write, in GB")
    parser.add_argument("--gzip", action="store_true", help="write NOTEEVENTS.csv.gz")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args(argv)
    notes = load_demo_notes()
    if args.rows:
        rows = scaled_rows(notes, args.rows, args.seed)
    elif args.gb:
        rows = scaled_rows(notes, 10**12, args.seed)
    else:
        rows = demo_rows(notes, args.seed)
    write_noteevents(args.out, rows, args.gzip, int(args.gb * 1e9) if args.gb else None)


if __name__ == "__main__":
    main()
