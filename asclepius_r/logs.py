"""Logging set-up used by every entry point (scripts, CLIs, benchmarks)."""

from __future__ import annotations

import logging
import sys


def setup_logging(log_file: str | None = None, level: int = logging.INFO) -> None:
    """Send log records (and, for Snakemake scripts, stderr) to `log_file` or the console."""
    if log_file:
        stream = open(log_file, "a", buffering=1, encoding="utf-8")
        sys.stderr = stream
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
