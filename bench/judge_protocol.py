"""Judge cost: the paper's protocol (every model's answer in one prompt) against one request per answer.

Both run through the project's LLM client against the local OpenAI-compatible test server
(real HTTP, a fixed per-request latency standing in for the model), on synthetic notes of the
length of a MIMIC discharge summary. Measured: requests, prompt tokens the server counted
(the note is sent once per question instead of once per answer) and wall time.

    .venv/bin/python bench/judge_protocol.py [--questions 200] [--models 6] [--latency 0.2]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from asclepius_r.config import defaults  # noqa: E402
from asclepius_r.evaluate.judge import JudgeSettings, judge  # noqa: E402
from asclepius_r.llm import ChatRequest, LLMClient, LLMSettings  # noqa: E402
from asclepius_r.prompts import render_judge_prompt  # noqa: E402
from support.openai_server import OpenAIServer  # noqa: E402

NOTE_WORDS = 1800  # about 2,400 tokens, a typical discharge summary


def scores_for(body: dict) -> str:
    count = body["messages"][0]["content"].count("'s Answer Begin]")
    return " ".join("3" for _ in range(count)) + "\nSynthetic verdict."


def client_for(server: OpenAIServer, archive: Path) -> LLMClient:
    return LLMClient(
        LLMSettings.from_config(
            defaults(
                "llm",
                backend="openai",
                model="bench-judge",
                base_url=server.url,
                api_key_env="BENCH_JUDGE_KEY",
                approved_endpoints=[server.url],
                archive=str(archive),
                temperature=0.0,
                max_tokens=64,
                max_concurrency=16,
                requests_per_minute=1e6,
                tokens_per_minute=1e9,
            )
        )
    )


def prompt_tokens(server: OpenAIServer) -> int:
    return sum(len("\n".join(m["content"] for m in r.body["messages"])) // 4 + 1 for r in server.chat_requests())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--questions", type=int, default=200)
    parser.add_argument("--models", type=int, default=6)
    parser.add_argument("--latency", type=float, default=0.2, help="seconds the server takes per request")
    args = parser.parse_args()
    os.environ["BENCH_JUDGE_KEY"] = "bench"
    note = " ".join(f"word{i % 500}" for i in range(NOTE_WORDS))
    items = [
        {
            "row_id": i,
            "task": "Summarization",
            "note": f"Note {i}. {note}",
            "question": f"Summarise note {i}.",
            "reference": "r",
        }
        for i in range(args.questions)
    ]
    models = [f"model-{m}" for m in range(args.models)]
    answers = {m: {i["row_id"]: f"An answer of {m} to question {i['row_id']}, " * 8 for i in items} for m in models}
    results = {}
    with tempfile.TemporaryDirectory() as work:
        with OpenAIServer(latency_s=args.latency, responder=scores_for) as server:
            start = time.perf_counter()
            verdicts = judge(
                items, answers, client_for(server, Path(work) / "ours.jsonl"), JudgeSettings.from_config(defaults())
            )
            results["ours (all answers in one prompt)"] = (
                time.perf_counter() - start,
                len(server.chat_requests()),
                prompt_tokens(server),
            )
            assert all(v["status"] == "ok" for v in verdicts)
        with OpenAIServer(latency_s=args.latency, responder=scores_for) as server:
            client = client_for(server, Path(work) / "baseline.jsonl")
            requests = [
                ChatRequest(
                    model="bench-judge",
                    messages=(("user", render_judge_prompt(i["note"], i["question"], [answers[m][i["row_id"]]])),),
                    temperature=0.0,
                    max_tokens=64,
                    meta={"row_id": i["row_id"], "phase": "judge"},
                )
                for i in items
                for m in models
            ]
            start = time.perf_counter()
            done = asyncio.run(client.run_async(requests))
            results["baseline (one request per answer)"] = (
                time.perf_counter() - start,
                len(server.chat_requests()),
                prompt_tokens(server),
            )
            assert all(r.ok for r in done)
    print(f"{args.questions} questions x {args.models} models, server latency {args.latency} s, 16 in flight")
    print(f"{'protocol':38} {'wall s':>8} {'requests':>9} {'prompt tokens':>14}")
    for name, (wall, count, tokens) in results.items():
        print(f"{name:38} {wall:8.2f} {count:9d} {tokens:14,d}")
    (ours_wall, ours_n, ours_tok), (base_wall, base_n, base_tok) = results.values()
    print(
        f"RESULT speedup={base_wall / ours_wall:.2f} request_ratio={base_n / ours_n:.2f} "
        f"prompt_token_ratio={base_tok / ours_tok:.2f}"
    )


if __name__ == "__main__":
    main()
