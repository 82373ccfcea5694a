"""Logging set-up used by every entry point (scripts, CLIs, benchmarks)."""

from __future__ import annotations

import logging
import os
import sys
from types import TracebackType

from asclepius_r.errors import UserError


def setup_logging(log_file: str | None = None, level: int = logging.INFO) -> None:
    """Send log records to `log_file` (or the console), and report uncaught errors there.

    With a file, the process's own stdout and stderr descriptors point there too, so that
    output of child processes (training under accelerate/torchrun), C libraries and progress
    bars lands in the rule's log instead of Snakemake's terminal. An uncaught UserError ends the
    process (status 1) with its message as one log line; any other exception with its traceback.
    """
    if log_file:
        sys.stdout.flush()
        sys.stderr.flush()
        target = open(log_file, "a", buffering=1, encoding="utf-8")
        os.dup2(target.fileno(), 1)
        os.dup2(target.fileno(), 2)
        sys.stderr = target  # also when something (a test runner) had replaced sys.stderr
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    sys.excepthook = _report_uncaught


def _report_uncaught(kind: type[BaseException], error: BaseException, traceback: TracebackType | None) -> None:
    if issubclass(kind, UserError):
        logging.getLogger("asclepius_r").error("%s", error)
    else:
        sys.__excepthook__(kind, error, traceback)
