"""Rebuild the demo's LLM archive from the hand-written responses in demo/responses/.

The demo's questions and answers were written by people for this project, not by a model.
This command runs the real instruction engine (same prompts, pools and client) with a backend
that answers from those files, and records every request and response into the archive that
the demo then replays. Rerun it whenever a prompt, the seed questions or the demo notes change:

    python -m support.demo_archive            (writes demo/llm_archive.jsonl)
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

from asclepius_r import config as workflow_config
from asclepius_r.files import atomic_path, read_jsonl
from asclepius_r.instructions.generate import GenerationSettings, generate
from asclepius_r.instructions.tasks import draw_task
from asclepius_r.llm import Archive, ChatRequest, ChatResult, LLMClient, LLMSettings
from asclepius_r.logs import setup_logging
from asclepius_r.notes.stage import NotePolicy, SplitPolicy, read_notes, run_notes_stage
from support.synthetic_notes import demo_row_id, demo_rows, load_demo_notes, write_noteevents

DEMO_DIR = Path(__file__).resolve().parents[1] / "demo"
log = logging.getLogger(__name__)


class HandwrittenBackend:
    """Answers each request with the hand-written question or answer for its note."""

    def __init__(self, responses: dict[int, dict]):
        self.responses = responses

    async def send(self, request: ChatRequest):
        row_id, phase = request.meta["row_id"], request.meta["phase"]
        if row_id not in self.responses:
            raise LookupError(f"no hand-written response for demo note ROW_ID {row_id}")
        text = self.responses[row_id][phase]
        prompt_chars = sum(len(c) for _, c in request.messages)
        usage = {
            "prompt_tokens": prompt_chars // 4,
            "completion_tokens": len(text) // 4,
            "total_tokens": (prompt_chars + len(text)) // 4,
        }
        now = time.time()
        return ChatResult(
            key=request.key,
            status="ok",
            text=text,
            finish_reason="stop",
            usage=usage,
            provider={"model": "hand-written (demo)"},
            started=now,
            finished=now,
        ), {}


def load_responses(responses_dir: Path, seed: int) -> dict[int, dict]:
    """ROW_ID -> {question, answer}; the task written by hand must be the task the seed draws."""
    responses = {}
    for path in sorted(responses_dir.glob("*.jsonl")):
        for line_no, record in enumerate(read_jsonl(path), start=1):
            row_id = demo_row_id(record["note"])
            expected = draw_task(row_id, seed)
            if record["task"] != expected:
                raise ValueError(
                    f"{path}:{line_no}: note {record['note']} draws task {expected!r} "
                    f"with seed {seed}, but its response was written for {record['task']!r}"
                )
            responses[row_id] = record
    return responses


def build(config_path: Path = DEMO_DIR / "config.yaml", responses_dir: Path = DEMO_DIR / "responses") -> Path:
    config = workflow_config.load(config_path, require_data=False)
    settings = LLMSettings.from_config(config["llm"])
    backend = HandwrittenBackend(load_responses(responses_dir, config["seed"]))
    archive_path = DEMO_DIR.parent / settings.archive
    with tempfile.TemporaryDirectory() as work, atomic_path(archive_path) as tmp_archive:
        work = Path(work)
        write_noteevents(work / "NOTEEVENTS.csv", demo_rows(load_demo_notes()))
        run_notes_stage(
            work / "NOTEEVENTS.csv",
            work / "discharge.parquet",
            work / "heldout.parquet",
            work / "heldout_row_ids.txt",
            work / "stats.json",
            NotePolicy.from_config(config["notes"]),
            SplitPolicy.from_config(config),
        )
        client = LLMClient(settings, backend=backend, archive=Archive(tmp_archive))
        for split in ("discharge", "heldout"):
            records, _ = generate(read_notes(work / f"{split}.parquet"), client, GenerationSettings.from_config(config))
            log.info("%s: %d records", split, len(records))
    log.info("wrote %s", archive_path)
    return archive_path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.parse_args(argv)
    setup_logging()
    build()


if __name__ == "__main__":
    main()
