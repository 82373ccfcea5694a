"""Ask a checkpoint one question about one note, with the released template byte for byte.

python -m asclepius_r.ask --model DIR --note NOTE.txt --question "What is the diagnosis?"
python -m asclepius_r.ask --model DIR --note NOTE.txt --question "..." --print-prompt
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .logs import setup_logging
from .prompts import render_released


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Answer a question about a discharge summary.")
    parser.add_argument("--model", required=True, help="a checkpoint folder (Hugging Face format)")
    parser.add_argument("--note", required=True, help="a text file holding the note ('-' for stdin)")
    parser.add_argument("--question", required=True)
    parser.add_argument("--max-new-tokens", type=int, default=400)
    parser.add_argument("--print-prompt", action="store_true", help="print the exact model input and stop")
    args = parser.parse_args(argv)
    note = sys.stdin.read() if args.note == "-" else Path(args.note).read_text(encoding="utf-8")
    if args.print_prompt:
        sys.stdout.write(render_released(note, args.question))
        return 0
    if not (Path(args.model) / "config.json").exists():
        parser.error(f"--model {args.model}: no config.json there (not a Hugging Face checkpoint folder)")
    from .generation import generate_answers, load_for_generation

    model, tokenizer = load_for_generation(args.model)
    print(generate_answers(model, tokenizer, [(note, args.question)], args.max_new_tokens)[0])
    return 0


if __name__ == "__main__":
    setup_logging()
    sys.exit(main())
