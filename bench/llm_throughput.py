"""Throughput of the LLM client under a request-per-minute limit, against a one-at-a-time client.

A local OpenAI-compatible server (support/openai_server.py) answers after `--latency` seconds,
enforces `--rpm` itself over 10-second windows (as Azure OpenAI does), answering 429 with
Retry-After beyond it, and injects faults (500s, malformed bodies). The client, configured with
the same limit, sends `--requests` distinct requests; the baseline sends a sample one at a time,
as the 2023 script did (without faults, its best case). Afterwards the server's request log is
checked: a request answered twice is a duplicate, a request without an archived answer is lost.

    python bench/llm_throughput.py            # 2,000 requests at 1,200 RPM (~2 min)
    python bench/llm_throughput.py --quick    # 600 requests (< 1 min)

Last line: RESULT limit_fraction=<f> speedup_vs_sequential=<x> duplicates=<n> lost=<n>
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from asclepius_r.config import defaults  # noqa: E402
from asclepius_r.llm import Archive, ChatRequest, LLMClient, LLMSettings  # noqa: E402
from asclepius_r.logs import setup_logging  # noqa: E402
from support.openai_server import OpenAIServer  # noqa: E402

KEY_ENV = "BENCH_LLM_API_KEY"


def bench_requests(n: int, tag: str) -> list[ChatRequest]:
    return [
        ChatRequest(
            model="bench-model",
            max_tokens=64,
            meta={"row_id": i, "phase": tag},
            messages=(("user", f"[{tag}] synthetic discharge summary {i}: afebrile, ambulating."),),
        )
        for i in range(n)
    ]


def settings_for(server: OpenAIServer, archive: Path, rpm: float, concurrency: int) -> LLMSettings:
    return LLMSettings.from_config(
        defaults(
            "llm",
            backend="openai",
            model="bench-model",
            base_url=server.url,
            api_key_env=KEY_ENV,
            approved_endpoints=[server.url],
            archive=str(archive),
            requests_per_minute=rpm,
            tokens_per_minute=1e9,
            max_concurrency=concurrency,
            timeout_s=10,
            backoff_base_s=0.2,
            backoff_max_s=2,
            max_attempts=8,
        )
    )


def run(client: LLMClient, requests: list[ChatRequest]) -> tuple[float, list]:
    started = time.monotonic()
    results = client.run(requests, desc="requests")
    return time.monotonic() - started, results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--rpm", type=float, default=1200, help="the server's limit, and the client's setting")
    parser.add_argument("--latency", type=float, default=0.3, help="seconds the server takes per request")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--sequential", type=int, default=40, help="requests the one-at-a-time baseline sends")
    parser.add_argument("--fault-rate", type=float, default=0.01, help="probability of each fault kind per request")
    parser.add_argument("--quick", action="store_true", help="600 requests and a 20-request baseline (< 1 min)")
    args = parser.parse_args(argv)
    if args.quick:
        args.requests, args.sequential = 600, 20
    setup_logging(level=logging.WARNING)
    os.environ.setdefault(KEY_ENV, "bench-key")

    with (
        tempfile.TemporaryDirectory() as work,
        OpenAIServer(latency_s=args.latency, rpm_limit=args.rpm, rpm_window_s=10, seed=1) as server,
    ):
        work = Path(work)
        with LLMClient(settings_for(server, work / "sequential.jsonl", args.rpm, 1)) as client:
            seq_elapsed, _ = run(client, bench_requests(args.sequential, "sequential"))
        sequential_rpm = args.sequential / seq_elapsed * 60  # without faults: the baseline's best case

        for kind in ("server_error", "malformed"):  # 429s come from the server's own limit
            server.add_fault(kind, times=None, probability=args.fault_rate)

        start_log = len(server.requests)
        requests = bench_requests(args.requests, "concurrent")
        with LLMClient(settings_for(server, work / "archive.jsonl", args.rpm, args.concurrency)) as client:
            elapsed, results = run(client, requests)
            stats = client.stats
        achieved_rpm = sum(r.ok for r in results) / elapsed * 60
        archive = Archive(work / "archive.jsonl")
        lost = sum(1 for r in requests if archive.get(r) is None)
        duplicates = sum(count - 1 for count in server.delivered().values() if count > 1)
        outcomes = {}
        for entry in server.requests[start_log:]:
            outcomes[entry.outcome] = outcomes.get(entry.outcome, 0) + 1

    print(
        f"limit {args.rpm:.0f} RPM, latency {args.latency * 1000:.0f} ms, concurrency {args.concurrency}, "
        f"fault rate {args.fault_rate} per kind"
    )
    print(f"one at a time: {args.sequential} requests in {seq_elapsed:.1f} s = {sequential_rpm:.0f} RPM")
    print(
        f"client:        {args.requests} requests in {elapsed:.1f} s = {achieved_rpm:.0f} RPM "
        f"({stats['attempts']} attempts)"
    )
    print(f"server outcomes: {dict(sorted(outcomes.items()))}")
    print(f"client retries: { {k: v for k, v in stats['retries'].items() if v} }, failed: {stats['failed']}")
    print(
        f"RESULT limit_fraction={achieved_rpm / args.rpm:.3f} "
        f"speedup_vs_sequential={achieved_rpm / sequential_rpm:.1f} duplicates={duplicates} lost={lost}"
    )


if __name__ == "__main__":
    main()
