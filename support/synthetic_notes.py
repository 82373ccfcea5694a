"""Deterministic synthetic NOTEEVENTS.csv in the exact MIMIC-III schema.

The demo file holds the project's hand-written discharge summaries (demo/discharge_summaries,
`NN-slug.txt`, addenda `NN-addendum-to-MM.txt`) plus what the real file has around them: other
note categories with their exact spellings (trailing spaces included), an ISERROR row, an
exact-duplicate text, a near-miss category, embedded newlines and quotes, and MIMIC
de-identification placeholders. `--rows N` or `--gb X` writes a file of any size instead
(ScaledNotes): the real category mix, log-normal note lengths per category, addenda, ISERROR
rows and duplicate texts in realistic shares; the benchmark and the tests use it.

`--long-notes N --tokenizer tokenizer.model` writes the rehearsal's file (LongDischargeNotes): N
discharge summaries whose lengths in that tokenizer's tokens follow MIMIC-III's.

    python -m support.synthetic_notes OUT.csv [--rows N | --gb X [--discharge-only] | --long-notes N --tokenizer T]
        [--gzip]
"""

from __future__ import annotations

import argparse
import gzip
import itertools
import math
import random
import re
from dataclasses import dataclass
from pathlib import Path
from statistics import NormalDist

from asclepius_r.notes.noteevents import COLUMNS, DISCHARGE_CATEGORY

DEMO_NOTES_DIR = Path(__file__).resolve().parents[1] / "demo" / "discharge_summaries"
DISCHARGE_ROW_ID_BASE = 50000  # note NN of the demo is ROW_ID 50000 + NN
SUBJECT_ID_BASE = 10000
_NAME = re.compile(r"^(\d{2})-(?:addendum-to-(\d{2})|.+)\.txt$")

# Real row counts per CATEGORY (reference/noteevents.md), exact spellings.
CATEGORY_MIX = {
    "Nursing/other": 822_497,
    "Radiology": 522_279,
    "Nursing": 223_556,
    "ECG": 209_051,
    "Physician ": 141_624,
    "Discharge summary": 59_652,
    "Echo": 45_794,
    "Respiratory ": 31_739,
    "Nutrition": 9_418,
    "General": 8_301,
    "Rehab Services": 5_431,
    "Social Work": 2_670,
    "Case Management ": 967,
    "Pharmacy": 103,
    "Consult": 98,
}

_OTHER_TEXT = {
    "Radiology": (
        "[**{date}**] {time} CHEST (PORTABLE AP)  Clip # [**Clip Number (Radiology) {n}**]\n"
        "Reason: eval for infiltrate\n\nFINDINGS: {finding}\n\nIMPRESSION: {impression}\n"
    ),
    "ECG": "Sinus rhythm at {rate}. {finding} Compared to the previous tracing of [**{date}**] no change.\n",
    "Echo": (
        "PATIENT/TEST INFORMATION:\nIndication: {finding}\nConclusions:\nThe left atrium is mildly dilated. "
        "LVEF {ef}%. {impression}\n"
    ),
    "Nursing/other": (
        "NPN 7p-7a:\nNeuro: A+Ox3, follows commands.\nCV: HR {rate} SR, no ectopy.\n"
        'Resp: LS clear, sats 96% on 2L NC.\nPt states "{quote}".\nPlan: cont to monitor.\n'
    ),
    "Nursing": "Nursing Progress Note\n{finding}\nFamily in to visit, updated by RN. Will continue current plan.\n",
    "Physician ": (
        "Chief Complaint: {finding}\n24 Hour Events:\n- {impression}\nAssessment and Plan\n"
        'Pt is a {age} y/o with {finding}, "doing better" per pt.\n'
    ),
    "Respiratory ": "Respiratory Care:\nPt remains on {mode}, RR {rate}, sats 97%. BS coarse bilat. Plan to wean as tol.\n",
    "Nutrition": "Nutrition Assessment:\nPt NPO, on TF at {rate} ml/hr, goal 60 ml/hr. Wt [**Numeric Identifier {n}**] kg.\n",
    "General": "Family meeting held with [**First Name8 (NamePattern2) {n}**] regarding goals of care.\n",
    "Rehab Services": "Physical Therapy Evaluation:\nPt ambulated 50 ft with RW and min assist. {impression}\n",
    "Social Work": 'SW note: met with pt and wife, "we are managing". Discussed supports at home, [**Location (un) {n}**].\n',
    "Case Management ": "CM: screening for rehab placement, referrals sent to [**Hospital {n}**].\n",
    "Pharmacy": "Pharmacy: vancomycin trough {rate}, dose adjusted to 1 g q12h.\n",
    "Consult": "Consult note: {finding}. Recommend {impression}\n",
}
_FINDINGS = [
    "mild cardiomegaly, no effusion",
    "new left lower lobe opacity",
    "hypotension, on pressors",
    "ST depressions in V4-V6",
    'worsening dyspnea, "can\'t catch my breath"',
    "fever to 101.2°F",
    "bibasilar atelectasis",
    "right IJ line tip in SVC",
]
_IMPRESSIONS = [
    "No acute cardiopulmonary process.",
    "Possible early pneumonia; clinical correlation advised.",
    "Interval improvement.",
    "Continue diuresis, repeat film in AM.",
    "Small pericardial effusion.",
]
_QUOTES = ["I want to go home", 'my chest hurts, "like before"', "when can I eat?", "I'm cold"]


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
    fields = [
        str(row_id),
        str(subject),
        str(hadm) if hadm else "",
        chartdate,
        charttime,
        storetime,
        _quote(category),
        _quote(description),
        str(cgid) if cgid else "",
        iserror,
        _quote(text),
    ]
    return ",".join(fields) + "\n"


def _date(rng: random.Random) -> str:
    return f"{rng.randint(2100, 2199)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"


def _other_text(rng: random.Random, category: str, date: str) -> str:
    """A short note of another category, its blanks filled from `rng`."""
    return _OTHER_TEXT[category].format(
        date=date,
        time=f"{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}",
        n=rng.randint(100, 9999),
        finding=rng.choice(_FINDINGS),
        impression=rng.choice(_IMPRESSIONS),
        rate=rng.randint(55, 120),
        ef=rng.randint(20, 65),
        quote=rng.choice(_QUOTES),
        age=rng.randint(25, 89),
        mode=rng.choice(["CPAP+PS 5/5", "AC 500x14", "2L NC"]),
    )


def _other_row(rng: random.Random, row_id: int, category: str) -> str:
    date = _date(rng)
    text = _other_text(rng, category, date)
    hadm = rng.randint(100000, 199999) if rng.random() > 0.1 else None  # some outpatient rows lack HADM_ID
    chartdate = date
    charttime = f"{date} {rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}:00"
    return _row(
        row_id,
        rng.randint(1, 99999),
        hadm,
        chartdate,
        charttime,
        charttime,
        category,
        "Report",
        rng.randint(14000, 21000),
        "",
        text,
    )


def _discharge_row(
    note: DemoNote,
    rng: random.Random,
    row_id: int | None = None,
    iserror: str = "",
    text: str | None = None,
    category: str = "Discharge summary",
) -> str:
    return _row(
        row_id or note.row_id,
        note.subject_id,
        100000 + (note.amends or note.number),
        f"21{note.number:02d}-0{1 + note.number % 9}-1{note.number % 10}",
        "",
        "",
        category,
        "Addendum" if note.amends else "Report",
        None,
        iserror,
        text or note.text,
    )


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
        _discharge_row(
            first,
            rng,
            row_id=DISCHARGE_ROW_ID_BASE + 100,
            iserror="1",
            text=first.text.replace("Discharge", "Dischrage", 1),
        ),
        # The same text stored twice under another ROW_ID; it follows the original so the first is kept.
        _discharge_row(second, rng, row_id=DISCHARGE_ROW_ID_BASE + 101),
        # A category that is 'Discharge summary' but for case and a trailing space.
        _discharge_row(
            notes[0],
            rng,
            row_id=DISCHARGE_ROW_ID_BASE + 102,
            category="discharge summary ",
            text='Addendum:\nPatient seen, "stable" for discharge.\n',
        ),
    ]
    return body + special


# Mean TEXT length in characters per CATEGORY. The reference gives only the totals (about 3.9 GB
# over 2,083,180 rows) and that discharge summaries run to thousands of words; these means are
# estimates that add up to that total, with ECG the shortest and physician notes and discharge
# summaries the longest. Lengths are log-normal around them.
MEAN_TEXT_CHARS = {
    "Nursing/other": 1_000,
    "Radiology": 1_550,
    "Nursing": 2_200,
    "ECG": 230,
    "Physician ": 6_000,
    "Discharge summary": 9_500,
    "Echo": 2_200,
    "Respiratory ": 1_400,
    "Nutrition": 2_700,
    "General": 1_900,
    "Rehab Services": 3_400,
    "Social Work": 2_300,
    "Case Management ": 1_400,
    "Pharmacy": 3_800,
    "Consult": 6_500,
}
LENGTH_SIGMA = 0.6
ADDENDUM_MEAN_CHARS = 1_500
ADDENDUM_FRACTION = 0.075  # MIMIC-III: 4,475 of 59,652 discharge summaries are addenda
ISERROR_FRACTION = 0.0005  # a few hundred flagged rows in the real file
DUPLICATE_TEXT_FRACTION = 0.003  # discharge rows that repeat an earlier discharge text exactly
ROWS_PER_SUBJECT = 45  # 2,083,180 rows over about 46,000 patients


class ScaledNotes:
    """An endless, seeded stream of rows in the real category mix and length distributions.

    Discharge summaries start from a demo note and grow with extra sections drawn from the demo
    notes' lines (so each text is distinct and keeps MIMIC's section layout, placeholders, quotes
    and unicode); other categories start from their own template and grow the same way.
    """

    def __init__(
        self, notes: list[DemoNote], seed: int = 7, n_subjects: int = 100_000, mix: dict[str, int] = CATEGORY_MIX
    ):
        self.rng = random.Random(seed)
        self.notes = notes
        self.n_subjects = max(10, n_subjects)
        self.lines = [line for note in notes for line in note.text.splitlines() if line.strip()]
        self.mean_line = sum(len(line) + 1 for line in self.lines) / len(self.lines)
        self.categories, self.weights = zip(*mix.items())
        self.recent_discharge: list[str] = []

    def _length(self, mean: float) -> int:
        return int(self.rng.lognormvariate(math.log(mean) - LENGTH_SIGMA**2 / 2, LENGTH_SIGMA))

    def _grow(self, text: str, target: int) -> str:
        """Append a dated section of random demo lines until `text` is about `target` long."""
        rng = self.rng
        k = max(1, round((target - len(text)) / self.mean_line))
        section = "\n".join(rng.choices(self.lines, k=k))
        return f"{text}\n\n{rng.choice(_SECTIONS)} [**{_date(rng)}**]:\n{section}"

    def _discharge_text(self, description: str) -> str:
        mean = ADDENDUM_MEAN_CHARS if description == "Addendum" else MEAN_TEXT_CHARS["Discharge summary"]
        start = "Addendum:" if description == "Addendum" else self.rng.choice(self.notes).text
        return self._grow(start, self._length(mean))

    def _discharge(self, row_id: int) -> str:
        rng = self.rng
        if self.recent_discharge and rng.random() < DUPLICATE_TEXT_FRACTION:
            text, description = rng.choice(self.recent_discharge)
        else:
            description = "Addendum" if rng.random() < ADDENDUM_FRACTION else "Report"
            text = self._discharge_text(description)
            self.recent_discharge = (self.recent_discharge + [(text, description)])[-100:]
        return _row(
            row_id,
            rng.randint(1, self.n_subjects),
            rng.randint(100000, 199999),
            _date(rng),
            "",
            "",
            "Discharge summary",
            description,
            None,
            "1" if rng.random() < ISERROR_FRACTION else "",
            text,
        )

    def _other(self, row_id: int, category: str) -> str:
        rng = self.rng
        text = _other_text(rng, category, _date(rng))
        target = self._length(MEAN_TEXT_CHARS[category])
        if target > len(text) + self.mean_line:
            text = self._grow(text, target)
        date = _date(rng)
        charttime = f"{date} {rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}:00"
        return _row(
            row_id,
            rng.randint(1, self.n_subjects),
            rng.randint(100000, 199999) if rng.random() > 0.1 else None,
            date,
            charttime,
            charttime,
            category,
            "Report",
            rng.randint(14000, 21000),
            "1" if rng.random() < ISERROR_FRACTION else "",
            text,
        )

    def __iter__(self):
        for row_id in itertools.count(1):
            category = self.rng.choices(self.categories, self.weights)[0]
            yield self._discharge(row_id) if category == "Discharge summary" else self._other(row_id, category)


_SECTIONS = [
    "Interval History",
    "Hospital Course, continued",
    "Pertinent Results",
    "Addendum to Plan",
    "Medications on Transfer",
    "Physical Exam on Discharge",
]


class LongDischargeNotes(ScaledNotes):
    """ScaledNotes whose discharge summaries have paper-shaped lengths in a model's tokens.

    Report lengths are log-normal in tokens (`median_tokens`, `sigma`; MIMIC-III discharge
    summaries: median about 1,800 LLaMA tokens, 10-20% over 3,000), drawn as stratified quantiles
    in shuffled order, so even a few dozen notes follow the distribution. A note starts from a demo
    note (about 2,100 tokens): a shorter one keeps its first and last lines (the end holds the
    discharge medications and follow-up), a longer one gets extra dated sections in the middle.
    The stream ends after `discharge_notes` reports; the other categories keep the real mix.
    """

    def __init__(
        self,
        notes: list[DemoNote],
        count_tokens,
        discharge_notes: int,
        median_tokens: float = 1800,
        sigma: float = 0.5,
        seed: int = 7,
        n_subjects: int = 100,
    ):
        super().__init__(notes, seed, n_subjects)
        self.count_tokens = count_tokens
        self.reports = [note for note in notes if note.amends is None]
        self.line_tokens: dict[str, int] = {}
        lengths = NormalDist(math.log(median_tokens), sigma)
        self.targets = [round(math.exp(lengths.inv_cdf((i + 0.5) / discharge_notes))) for i in range(discharge_notes)]
        self.rng.shuffle(self.targets)

    def _tokens(self, line: str) -> int:
        """Tokens of a line and its newline (a sum over lines is within a few % of the note's count)."""
        if line not in self.line_tokens:
            self.line_tokens[line] = self.count_tokens(line) + 1
        return self.line_tokens[line]

    def _fit(self, lines: list[str], budget: int) -> list[str]:
        """The leading `lines` whose tokens add up closest to `budget`."""
        kept = []
        for line in lines:
            if budget <= 0 or self._tokens(line) > 2 * budget:
                break
            kept.append(line)
            budget -= self._tokens(line)
        return kept

    def _discharge_text(self, description: str) -> str:
        if description == "Addendum" or not self.targets:
            return super()._discharge_text(description)
        rng, target = self.rng, self.targets.pop()
        lines = rng.choice(self.reports).text.split("\n")
        head, tail = lines[: len(lines) // 2], lines[len(lines) // 2 :]
        missing = target - self.count_tokens("\n".join(lines))
        if missing < 0:
            # About 60% of the budget from the start, the rest from the end.
            head = self._fit(head, round(target * 0.6))
            tail = self._fit(tail[::-1], target - sum(map(self._tokens, head)))[::-1]
            return "\n".join(head + tail)
        middle = []
        while missing > 0:
            section = [f"\n{rng.choice(_SECTIONS)} [**{_date(rng)}**]:"]
            section += self._fit(rng.choices(self.lines, k=40), min(missing, 400))
            middle += section
            missing -= sum(self._tokens(line) for line in section)
        return "\n".join(head + middle + tail)

    def __iter__(self):
        for row in super().__iter__():
            yield row
            if not self.targets:
                return


def write_noteevents(
    out: str | Path, rows, gzip_output: bool = False, max_rows: int | None = None, max_bytes: int | None = None
) -> tuple[int, int]:
    """Write the header and `rows` (stopping after `max_rows` or once `max_bytes` are written).

    Returns (rows, bytes) written, bytes counted before compression.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    header = (",".join(f'"{c}"' for c in COLUMNS) + "\n").encode()
    n_rows, n_bytes = 0, len(header)
    with gzip.open(out, "wb", compresslevel=6) if gzip_output else open(out, "wb") as csv_file:
        csv_file.write(header)
        for row in itertools.islice(rows, max_rows):
            data = row.encode("utf-8")
            csv_file.write(data)
            n_rows, n_bytes = n_rows + 1, n_bytes + len(data)
            if max_bytes and n_bytes >= max_bytes:
                break
    return n_rows, n_bytes


def write_long_noteevents(
    out: str | Path,
    tokenizer_model: str | Path,
    discharge_summaries: int,
    median_tokens: float = 1800,
    sigma: float = 0.5,
    seed: int = 7,
) -> tuple[int, int]:
    """A NOTEEVENTS.csv of LongDischargeNotes, lengths counted by a SentencePiece model; returns (rows, bytes)."""
    import sentencepiece as spm

    processor = spm.SentencePieceProcessor(model_file=str(tokenizer_model))
    rows = LongDischargeNotes(
        load_demo_notes(),
        lambda text: len(processor.encode(text)),
        discharge_summaries,
        median_tokens,
        sigma,
        seed,
        # about MIMIC's rows per patient: 1 discharge summary in 35 rows, 45 rows per patient
        n_subjects=max(10, discharge_summaries * 35 // ROWS_PER_SUBJECT),
    )
    return write_noteevents(out, iter(rows))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--rows", type=int, help="rows to write, in the real category mix")
    size.add_argument("--gb", type=float, help="approximate size to write, in GB (10^9 bytes, uncompressed)")
    size.add_argument(
        "--long-notes",
        type=int,
        metavar="N",
        help="N discharge summaries with paper-shaped token lengths (and other categories in their mix)",
    )
    parser.add_argument(
        "--tokenizer", help="with --long-notes: the SentencePiece tokenizer.model lengths are counted in"
    )
    parser.add_argument("--median-tokens", type=float, default=1800)
    parser.add_argument("--sigma", type=float, default=0.5)
    parser.add_argument("--gzip", action="store_true", help="write NOTEEVENTS.csv.gz")
    parser.add_argument(
        "--discharge-only",
        action="store_true",
        help="with --rows or --gb: discharge summaries only (fewer, longer records than the real mix)",
    )
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args(argv)
    if args.long_notes:
        if not args.tokenizer:
            parser.error("--long-notes needs --tokenizer")
        n_rows, n_bytes = write_long_noteevents(
            args.out, args.tokenizer, args.long_notes, args.median_tokens, args.sigma, args.seed
        )
        print(f"{args.out}: {n_rows} rows, {n_bytes / 1e6:.1f} MB uncompressed")
        return
    notes = load_demo_notes()
    if args.rows or args.gb:
        # Mean row is about 1.9 kB in the real mix, so this keeps patients' note counts near MIMIC's at any size.
        mix = {DISCHARGE_CATEGORY: 1} if args.discharge_only else CATEGORY_MIX
        row_bytes = MEAN_TEXT_CHARS[DISCHARGE_CATEGORY] if args.discharge_only else 1900
        expected_rows = args.rows or int(args.gb * 1e9 / row_bytes)
        rows = iter(ScaledNotes(notes, args.seed, n_subjects=expected_rows // ROWS_PER_SUBJECT, mix=mix))
    else:
        rows = iter(demo_rows(notes, args.seed))
    n_rows, n_bytes = write_noteevents(
        args.out, rows, args.gzip, max_rows=args.rows, max_bytes=int(args.gb * 1e9) if args.gb else None
    )
    print(f"{args.out}: {n_rows} rows, {n_bytes / 1e6:.1f} MB uncompressed")


if __name__ == "__main__":
    from asclepius_r.logs import setup_logging

    setup_logging()
    main()
