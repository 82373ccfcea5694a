"""Ask a checkpoint one question about one note, with the released template byte for byte.

python -m asclepius_r.evaluate.ask --model DIR --note NOTE.txt --question "What is the diagnosis?"
python -m asclepius_r.evaluate.ask --model DIR --note NOTE.txt --question "..." --print-prompt

A note too long for the model's context is cut (`--truncation`), never the question.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from asclepius_r.config import defaults
from asclepius_r.logs import setup_logging
from asclepius_r.prompts import render_released


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Answer a question about a discharge summary.")
    parser.add_argument("--model", required=True, help="a checkpoint folder (Hugging Face format)")
    parser.add_argument("--note", required=True, help="a text file holding the note ('-' for stdin)")
    parser.add_argument("--question", required=True)
    parser.add_argument("--max-new-tokens", type=int, default=defaults("evaluate")["max_new_tokens"])
    parser.add_argument(
        "--truncation",
        choices=["note_middle", "note_tail"],
        default="note_middle",
        help="how a note too long for the model's context is cut (the question is always kept)",
    )
    parser.add_argument("--print-prompt", action="store_true", help="print the exact model input and stop")
    args = parser.parse_args(argv)
    note = sys.stdin.read() if args.note == "-" else Path(args.note).read_text(encoding="utf-8")
    if args.print_prompt:
        sys.stdout.write(render_released(note, args.question))
        return 0
    if not (Path(args.model) / "config.json").exists():
        parser.error(f"--model {args.model}: no config.json there (not a Hugging Face checkpoint folder)")
    from asclepius_r.evaluate.generation import (
        Decoding,
        fit_prompts,
        generate_answers,
        load_for_generation,
        prompt_budget,
    )

    decoding = Decoding.from_config(defaults("evaluate", max_new_tokens=args.max_new_tokens))
    model, tokenizer = load_for_generation(args.model)
    budget = prompt_budget(model, args.max_new_tokens)
    prompt = fit_prompts(tokenizer, [(note, args.question)], budget, args.truncation)[0]
    if prompt.truncated:
        print(f"note cut ({args.truncation}) to fit {budget} prompt tokens", file=sys.stderr)
    print(generate_answers(model, tokenizer, [prompt.text], decoding, batch_size=1)[0])
    return 0


if __name__ == "__main__":
    setup_logging()
    sys.exit(main())
