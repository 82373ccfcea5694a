"""The released inference template, byte for byte, through `python -m asclepius_r.evaluate.ask`."""

from __future__ import annotations

import subprocess
import sys

from asclepius_r.prompts import RELEASED_TEMPLATE, render_released

EXPECTED = (
    "You are an intelligent clinical languge model.\n"
    "Below is a snippet of patient's discharge summary and a following instruction from healthcare professional.\n"
    "Write a response that appropriately completes the instruction.\n"
    "The response should provide the accurate answer to the instruction, while being concise.\n"
    "\n"
    "[Discharge Summary Begin]\n"
    'Pt is a 67 y/o M with "CHF", {braces} kept.\n'
    "[Discharge Summary End]\n"
    "\n"
    "[Instruction Begin]\n"
    "What is the diagnosis?\n"
    "[Instruction End] \n"
)


def test_template_is_the_released_one():
    assert render_released('Pt is a 67 y/o M with "CHF", {braces} kept.', "What is the diagnosis?") == EXPECTED
    assert RELEASED_TEMPLATE.count("{") == 2, "only {note} and {question} are fields"


def test_ask_cli_prints_the_exact_prompt(tmp_path):
    note = tmp_path / "note.txt"
    note.write_text('Pt is a 67 y/o M with "CHF", {braces} kept.', encoding="utf-8")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "asclepius_r.evaluate.ask",
            "--model",
            str(tmp_path),
            "--note",
            str(note),
            "--question",
            "What is the diagnosis?",
            "--print-prompt",
        ],
        capture_output=True,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode("utf-8") == EXPECTED


def test_ask_cli_rejects_a_folder_that_is_not_a_checkpoint(tmp_path):
    note = tmp_path / "note.txt"
    note.write_text("x")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "asclepius_r.evaluate.ask",
            "--model",
            str(tmp_path),
            "--note",
            str(note),
            "--question",
            "q",
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0 and "config.json" in result.stderr
