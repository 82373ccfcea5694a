"""The whole instruction stage against a rate-limited server with a long latency tail.

The stage runs as a user runs it (`python -m asclepius_r.instructions.generate`, a process of its own)
on synthetic notes, against the local OpenAI-compatible server (support/openai_server.py) that
answers after a log-normal delay (median `--latency`, `--sigma`, capped at `--latency-max`) and
enforces `--rpm` itself over 10-second windows, answering 429 beyond it. The client is set to
the same limit and a token limit that never binds. The baseline is the same run with the wave
design, from the package as it was at `--baseline-ref` (waves of 256, 64 in flight: the
settings of issue 11); the new run uses the default concurrency.

    python bench/instruction_stage.py                   # 1,000 notes at 500 RPM, 4 s median (~12 min)
    python bench/instruction_stage.py --notes 57000 --time-scale 25 --no-baseline
    python bench/instruction_stage.py --notes 57000 --time-scale 30 --baseline-ref edf2109 --baseline-flow

`--baseline-flow` runs the baseline package with the new run's settings (continuous flow, for a
package from after the wave design), to compare memory or speed across commits of the flow.

`--time-scale k` divides the latencies and multiplies the limit by k: the same shape, k times
faster. limit_fraction = requests answered / (the limit x the stage's wall time, its start-up
included). Besides the rate, each run reports where its wall time went (the start-up before the
first request, the requests of the first minute, the steady rate after it, and the drain after
the last request), its peak RSS (the RSS at each quarter of the run, and its growth per note after
the first quarter: flat is near 0), and its CPU time as a share of the wall time: the time it
spends outside waiting for the server. Afterwards the
near-duplicate filter (ROUGE-L 0.7, on in both runs) is timed alone on the run's own questions at
growing sizes (bench/near_duplicate_filter.py compares it with the filter before).

Last line: RESULT limit_fraction=<f> baseline_limit_fraction=<f> wall_s=<s> peak_rss_mb=<mb>
rss_growth_kb_per_note=<kb> busy_share=<f>
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from asclepius_r.files import read_jsonl  # noqa: E402
from asclepius_r.instructions.generate import NearDuplicateIndex  # noqa: E402
from asclepius_r.logs import setup_logging  # noqa: E402
from asclepius_r.notes.stage import OUTPUT_ROW_GROUP  # noqa: E402
from support.openai_server import OpenAIServer, prompt_text, request_identity  # noqa: E402

KEY_ENV = "BENCH_LLM_API_KEY"
# The last commit with the wave design (waves of `wave_size` notes; pools grow between waves).
WAVE_DESIGN_REF = "96865cb"
ROUGE = 0.7
CONDITIONS = ("pneumonia", "atrial fibrillation", "cellulitis", "diabetic ketoacidosis", "bowel obstruction")
WORDS = [f"term{i:04d}" for i in range(3000)]
WEIGHTS = [1 / (rank + 1) for rank in range(len(WORDS))]  # Zipf-like, as words are in questions


def synthetic_notes(n: int, chars: int = 1500) -> pa.Table:
    """Made-up discharge summaries of about `chars` characters (no patient data)."""
    days = max(1, round((chars - 114) / 66))  # a hospital day's sentence is 66 characters: 21 at 1,500
    texts = [
        f"Admission Date: [**2150-1-{1 + i % 28}**]\nSynthetic patient {i} was admitted with "
        f"{CONDITIONS[i % len(CONDITIONS)]}. "
        + " ".join(f"Hospital day {d}: vitals stable, labs reviewed, plan continued." for d in range(1, days + 1))
        + " Discharged home in stable condition."
        for i in range(n)
    ]
    return pa.table({"ROW_ID": range(100_000, 100_000 + n), "SUBJECT_ID": range(n), "TEXT": texts})


def responder(body: dict) -> str:
    """Questions of 6-14 words, Zipf-distributed and seeded by the request, so the near-duplicate
    filter sees a realistic vocabulary; answers are a plain statement."""
    rng = random.Random(request_identity(body))
    if "[Example Questions Begin]" in prompt_text(body):
        return "What " + " ".join(rng.choices(WORDS, WEIGHTS, k=rng.randint(5, 13))) + "?"
    return f"The summary documents {rng.choice(WORDS)} and {rng.choice(WORDS)}."


def package_at(ref: str, work: Path) -> Path:
    """The package as committed at `ref`, extracted to put first on PYTHONPATH."""
    target = work / f"package-{ref}"
    target.mkdir()
    archive = subprocess.run(["git", "-C", str(REPO), "archive", ref, "asclepius_r"], check=True, capture_output=True)
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive.stdout, check=True)
    return target


def write_config(path: Path, server: OpenAIServer, rpm: float, archive: Path, waves: bool) -> None:
    llm = {
        "backend": "openai",
        "model": "gpt-4o-mini",
        "base_url": server.url,
        "api_key_env": KEY_ENV,
        "approved_endpoints": [server.url],
        "archive": str(archive),
        "requests_per_minute": rpm,
        "tokens_per_minute": 1e12,
        "timeout_s": 120,
    }
    instructions = {"near_duplicate_rouge": ROUGE}
    if waves:
        llm["max_concurrency"] = 64
        instructions["wave_size"] = 256
    config = {"noteevents": None, "models": {"7B": {"base": "tiny"}}, "instructions": instructions, "llm": llm}
    path.write_text(yaml.safe_dump(config))


def run_stage(
    tag: str, work: Path, server: OpenAIServer, rpm: float, notes: int, pythonpath: Path | None, waves: bool = False
) -> dict:
    """One stage run in its own process; its wall time, CPU time, peak RSS and the server's view."""
    config = work / f"{tag}.yaml"
    write_config(config, server, rpm, work / f"{tag}-archive.jsonl", waves)
    command = [sys.executable, "-m", "asclepius_r.instructions.generate", "--config", str(config)]
    command += ["--notes", str(work / "notes.parquet"), "--records", str(work / f"{tag}.jsonl")]
    command += ["--stats", str(work / f"{tag}.stats.json"), "--dataset", str(work / f"{tag}.csv")]
    command += ["--log", str(work / f"{tag}.log")]
    env = {**os.environ, KEY_ENV: "bench-key", "PYTHONPATH": str(pythonpath or REPO)}
    logged = len(server.requests)
    started, started_epoch = time.monotonic(), time.time()
    stderr = open(work / f"{tag}.stderr", "wb")  # the progress bar, and a traceback if it fails
    stage = subprocess.Popen(command, env=env, stderr=stderr, cwd=work)  # not the checkout: it would come first
    rss: list[tuple[float, int, int]] = []
    sampler = threading.Thread(target=_sample_rss, args=(stage.pid, rss), daemon=True)
    sampler.start()
    _, status, usage = os.wait4(stage.pid, 0)
    wall = time.monotonic() - started
    stage.returncode = os.waitstatus_to_exitcode(status)
    stderr.close()
    if stage.returncode:
        tail = ((work / f"{tag}.stderr").read_text() + (work / f"{tag}.log").read_text())[-3000:]
        raise SystemExit(f"{tag}: the stage failed ({stage.returncode}):\n{tail}")
    outcomes: dict[str, int] = {}
    for entry in server.requests[logged:]:
        outcomes[entry.outcome] = outcomes.get(entry.outcome, 0) + 1
    received = sorted(entry.received - started_epoch for entry in server.requests[logged:] if entry.outcome == "ok")
    first, last = received[0], received[-1]
    quarters = [max((kb for t, kb, _ in rss if t <= wall * q / 4), default=0) // 1024 for q in (1, 2, 3, 4)]
    # the notes settle at a steady rate, so the last three quarters hold about 3/4 of them
    growth_kb_per_note = (quarters[3] - quarters[0]) * 1024 / (0.75 * notes)
    return {
        "wall_s": wall,
        "ok": outcomes.get("ok", 0),
        "outcomes": outcomes,
        "rpm": outcomes.get("ok", 0) / wall * 60,
        "peak_rss_mb": max(hwm for *_, hwm in rss) // 1024,
        "rss_quarters_mb": quarters,
        "rss_growth_kb_per_note": growth_kb_per_note,
        "busy_share": (usage.ru_utime + usage.ru_stime) / wall,
        # where the wall time goes: the stage's start-up (imports, notes), the first minute of
        # requests (the in-flight limit before latencies are known), the steady state, and the
        # last answers after the last request went out
        "first_request_s": first,
        "first_minute_rpm": sum(1 for t in received if t < first + 60),
        "steady_rpm": sum(1 for t in received if t >= first + 60) / max(last - first - 60, 1e-9) * 60,
        "drain_s": wall - last,
    }


def _sample_rss(pid: int, samples: list[tuple[float, int, int]]) -> None:
    """(seconds, VmRSS, VmHWM in KB) of the stage every 0.2 s. Its peak is its own VmHWM: the
    `ru_maxrss` that wait4 reports for a child started by vfork and exec (as subprocess does) is
    at least this process's high-water mark, which holds the notes table and the server's log."""
    started = time.monotonic()
    while True:
        if samples and int(samples[-1][0]) // 60 != int(time.monotonic() - started) // 60:
            print(f"  ... {time.monotonic() - started:.0f} s, RSS {samples[-1][1] // 1024} MB", flush=True)
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except (FileNotFoundError, ProcessLookupError):
            return
        fields = dict(line.split(":", 1) for line in status.splitlines() if line.startswith(("VmRSS", "VmHWM")))
        if "VmRSS" not in fields:  # a zombie: the stage has ended
            return
        samples.append((time.monotonic() - started, int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])))
        time.sleep(0.2)


def filter_cost(records: list[dict]) -> list[tuple[int, float]]:
    """CPU seconds of the stage's near-duplicate filtering (one index per task, questions in note
    order) over the first n notes' questions, n growing fourfold: per question, flat if linear."""
    sizes, n = [], 1000
    while n < len(records):
        sizes.append(n)
        n *= 4
    sizes.append(len(records))
    timings = []
    for size in sizes:
        indexes: dict[str, NearDuplicateIndex] = {}
        started = time.process_time()
        for record in records[:size]:
            index = indexes.setdefault(record["task"], NearDuplicateIndex(ROUGE))
            if record["question"] and not index.is_near_duplicate(record["question"]):
                index.add(record["question"])
        timings.append((size, time.process_time() - started))
    return timings


def describe(tag: str, run: dict, rpm: float) -> str:
    return (
        f"{tag:9s} {run['ok']} answers in {run['wall_s']:.1f} s = {run['rpm']:.0f} RPM "
        f"({run['rpm'] / rpm:.3f} of the limit), peak RSS {run['peak_rss_mb']} MB "
        f"(by quarter {run['rss_quarters_mb']}, {run['rss_growth_kb_per_note']:.2f} KB a note after the first), "
        f"busy {run['busy_share']:.2f} of the wall time, "
        f"first request at {run['first_request_s']:.1f} s, {run['first_minute_rpm']} requests in its first minute, "
        f"then {run['steady_rpm']:.0f} RPM, {run['drain_s']:.1f} s after the last one sent, "
        f"server outcomes {dict(sorted(run['outcomes'].items()))}"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--notes", type=int, default=1000)
    parser.add_argument("--note-chars", type=int, default=1500, help="about 10,000 for MIMIC discharge summaries")
    parser.add_argument("--rpm", type=float, default=500, help="the server's limit, and the client's setting")
    parser.add_argument("--latency", type=float, default=4.0, help="median seconds per request")
    parser.add_argument("--sigma", type=float, default=0.7, help="log-normal sigma of the latency")
    parser.add_argument("--latency-max", type=float, default=35.0)
    parser.add_argument("--time-scale", type=float, default=1.0, help="latencies / k, limit x k")
    parser.add_argument("--baseline-ref", default=WAVE_DESIGN_REF, help="git ref of the wave design")
    parser.add_argument("--baseline-flow", action="store_true", help="the baseline ref runs the flow, not waves")
    parser.add_argument("--no-baseline", action="store_true")
    args = parser.parse_args(argv)
    setup_logging(level=logging.WARNING)
    rpm = args.rpm * args.time_scale

    with (
        tempfile.TemporaryDirectory() as work,
        OpenAIServer(
            latency_s=args.latency / args.time_scale,
            latency_sigma=args.sigma,
            latency_max_s=args.latency_max / args.time_scale,
            responder=responder,
            rpm_limit=rpm,
            rpm_window_s=10,
            seed=1,
        ) as server,
    ):
        work = Path(work)
        # in row groups as the notes stage writes them: the stage reads the texts a row group at a time
        notes = synthetic_notes(args.notes, args.note_chars)
        pq.write_table(notes, work / "notes.parquet", row_group_size=OUTPUT_ROW_GROUP)
        baseline = None
        if not args.no_baseline:
            baseline = run_stage(
                "baseline",
                work,
                server,
                rpm,
                args.notes,
                package_at(args.baseline_ref, work),
                waves=not args.baseline_flow,
            )
        flow = run_stage("flow", work, server, rpm, args.notes, None)
        records = read_jsonl(work / "flow.jsonl")
        accepted = sum(1 for r in records if r["status"] == "ok")

    print(
        f"{args.notes} notes, limit {rpm:.0f} RPM, latency log-normal median {args.latency / args.time_scale:.3f} s "
        f"sigma {args.sigma} max {args.latency_max / args.time_scale:.2f} s"
    )
    if baseline:
        design = "flow" if args.baseline_flow else "waves"
        print(describe(f"{design}@{args.baseline_ref}", baseline, rpm))
    print(describe("flow", flow, rpm))
    print(f"accepted {accepted} of {args.notes}; the near-duplicate filter alone on the run's questions (CPU):")
    for size, seconds in filter_cost(records):
        print(f"  {size:6d} notes: {seconds:.2f} s ({seconds / size * 1e6:.0f} us per note)")
    baseline_fraction = f"{baseline['rpm'] / rpm:.3f}" if baseline else "nan"
    print(
        f"RESULT limit_fraction={flow['rpm'] / rpm:.3f} baseline_limit_fraction={baseline_fraction} "
        f"wall_s={flow['wall_s']:.1f} peak_rss_mb={flow['peak_rss_mb']} "
        f"rss_growth_kb_per_note={flow['rss_growth_kb_per_note']:.2f} busy_share={flow['busy_share']:.2f}"
    )


if __name__ == "__main__":
    main()
