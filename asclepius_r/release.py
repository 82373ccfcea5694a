"""The PhysioNet release folder: checkpoints, the dataset, held-out ROW_IDs and SHA256SUMS."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from .files import atomic_path, sha256_file

log = logging.getLogger(__name__)


def write_sha256sums(folder: Path) -> None:
    """`sha256sum -c SHA256SUMS` inside `folder` verifies every file."""
    lines = [f"{sha256_file(p)}  {p.relative_to(folder).as_posix()}\n"
             for p in sorted(folder.rglob("*")) if p.is_file() and p.name != "SHA256SUMS"]
    (folder / "SHA256SUMS").write_text("".join(lines))


def build_release(out_dir, models: dict[str, str], files: dict[str, str]) -> None:
    """Copy `models` (release name -> checkpoint folder) and `files` (name -> path) into `out_dir`."""
    with atomic_path(out_dir, is_dir=True) as tmp:
        for name, folder in sorted(models.items()):
            shutil.copytree(folder, tmp / name, ignore=shutil.ignore_patterns("training_run.json"))
        for name, path in sorted(files.items()):
            shutil.copy2(path, tmp / name)
        write_sha256sums(tmp)
    log.info("release: %d checkpoints and %d files in %s", len(models), len(files), out_dir)
