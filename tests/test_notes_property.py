"""Property: any TEXT (quotes, newlines, commas, unicode, placeholders) survives the notes stage
byte for byte, whatever Arrow's block boundaries cut through."""

from __future__ import annotations

import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from support.default_settings import note_policy

from .notes_support import expected_kept, kept_rows, note, run, write_noteevents

# Everything a note may hold except NUL (rejected by design) and lone surrogates (not encodable).
CHARACTERS = st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00")
PIECES = st.sampled_from(['"', '""', "\n", "\r\n", "\r", ",", ", ", "[**", "**]", "é", "°F", "🫀", " ", "\t"])
TEXTS = st.lists(st.one_of(PIECES, st.text(CHARACTERS, max_size=20)), max_size=30).map("".join)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(texts=st.lists(TEXTS, min_size=1, max_size=6), categories=st.lists(st.booleans(), min_size=6, max_size=6))
def test_texts_survive_exactly(texts, categories):
    rows = [
        note(i + 1, text, category="Discharge summary" if keep or i == 0 else "Radiology")
        for i, (text, keep) in enumerate(zip(texts, categories))
    ]
    policy = note_policy(drop_duplicate_text=False)
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        path = write_noteevents(work / "NOTEEVENTS.csv", rows)
        result = run(work, path, policy)
        assert kept_rows(result) == sorted(expected_kept(path, policy))
        assert [t for _, t in kept_rows(result)] == [r["TEXT"] for r in rows if r["CATEGORY"] == "Discharge summary"]
