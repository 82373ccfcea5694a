"""`make rehearsal`: the paper run's shape on a CPU, then the checks the paper run needs.

Starts the local OpenAI-compatible server (support/openai_server.py) with long-tailed latency and
injected faults, answering as a generating LLM and as the judge would; runs the whole workflow
with config.yaml overlaid by rehearsal/config.yaml under `--resources gpu=8`, the GPU claim shown a
fake list of 8 devices (ASCLEPIUS_FAKE_GPUS); then runs rehearsal/check.py on the results and
writes the wall time to results/rehearsal/timing.json. Everything is made in its own working
folder, rehearsal/workdir/ (results/, release/, logs/), never in the demo's results/. A second
run reruns nothing: the server's port, new each time, is an operational setting (llm.base_url),
and the checks pass on what the first run made.

    python -m rehearsal.run [--cores N] [SNAKEMAKE ARGS...]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import yaml

from support.openai_server import OpenAIServer, prompt_text, request_identity

from . import check

log = logging.getLogger("rehearsal")

REPO = Path(__file__).resolve().parents[1]
OUT = Path("results/rehearsal")  # in the working folder, check.WORKDIR
FAKE_GPUS = [str(i) for i in range(8)]
API_KEY_ENV = "REHEARSAL_API_KEY"  # the config's llm.api_key_env; the local server takes any key

_NOTE = re.compile(r"\[Discharge Summary Begin\]\n(.*?)\n\[Discharge Summary End\]", re.DOTALL)
_AGENT = re.compile(r"\[Agent ([A-Z])'s Answer Begin\]")


def respond(body: dict) -> str:
    """What a generating LLM and the judge would reply, deterministic per request.

    Questions name a topic; answers quote 2-5 lines from the note's last 40% (where discharge
    medications and follow-up are, the part a tail cut loses); the judge gives one score per
    agent, and one first reply in ten is unreadable so the judge's correction turn runs.
    """
    digest = request_identity(body)
    pick = random.Random(digest)
    text = prompt_text(body)
    agents = _AGENT.findall(text)
    if agents:
        if len(body["messages"]) == 1 and pick.random() < 0.1:
            return "Here are my scores:\n" + " ".join(str(pick.randint(1, 4)) for _ in agents)
        return " ".join(str(pick.randint(1, 4)) for _ in agents) + "\nRehearsal judge: scores drawn at random."
    if "[Example Questions Begin]" in text:
        topic = pick.choice(["discharge medications", "follow-up", "the hospital course", "the diagnoses"])
        return f"What does the discharge summary say about {topic} ({digest[:6]})?"
    note = _NOTE.search(text)
    lines = [line for line in (note.group(1) if note else text).splitlines() if line.strip()]
    tail = lines[int(len(lines) * 0.6) :] or lines
    return " ".join(pick.sample(tail, min(len(tail), pick.randint(2, 5))))


def rehearsal_server(seed: int, timeout_s: float) -> OpenAIServer:
    server = OpenAIServer(
        # Log-normal latency, median 80 ms, 1% over about 0.8 s: a chat API's long tail, scaled down.
        latency_s=0.08,
        latency_sigma=1.0,
        responder=respond,
        seed=seed,
    )
    server.add_fault("rate_limit", times=None, probability=0.04, retry_after=0.2)
    server.add_fault("server_error", times=None, probability=0.03)
    server.add_fault("malformed", times=None, probability=0.02)
    server.add_fault("length", times=None, probability=0.02)
    server.add_fault("stall", times=2, stall_s=timeout_s + 1)
    return server


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cores", default="2")
    args, snakemake_args = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    config = yaml.safe_load((REPO / "rehearsal" / "config.yaml").read_text())
    check.WORKDIR.mkdir(parents=True, exist_ok=True)
    os.chdir(check.WORKDIR)
    OUT.mkdir(parents=True, exist_ok=True)
    lock_dir = OUT / "gpu-locks"
    lock_dir.mkdir(exist_ok=True)
    started = time.monotonic()
    with rehearsal_server(config["seed"], config["llm"]["timeout_s"]) as server:
        endpoint = OUT / "endpoint.yaml"
        endpoint.write_text(yaml.safe_dump({"llm": {"base_url": server.url, "approved_endpoints": [server.url]}}))
        env = {
            **os.environ,
            "ASCLEPIUS_FAKE_GPUS": ",".join(FAKE_GPUS),
            "ASCLEPIUS_GPU_LOCK_DIR": str(lock_dir.resolve()),
            API_KEY_ENV: "rehearsal",
        }
        # Config files given on the command line replace the Snakefile's own (config.yaml, which
        # lies in the checkout, not in this working folder), so config.yaml is named first.
        command = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", "."]
        command += ["--configfile", str(REPO / "config.yaml"), str(REPO / "rehearsal" / "config.yaml"), str(endpoint)]
        command += ["--cores", args.cores, "--resources", "gpu=8", "--show-failed-logs", *snakemake_args]
        log.info("%s (server %s)", " ".join(command), server.url)
        done = subprocess.run(command, env=env)
        outcomes = server.outcomes()
    workflow_s = time.monotonic() - started
    log.info("workflow: %.0f s; server answered %s", workflow_s, dict(outcomes))
    if done.returncode:
        return done.returncode
    failures = check.run_all(config, FAKE_GPUS, outcomes)
    timing = {"workflow_s": round(workflow_s, 1), "total_s": round(time.monotonic() - started, 1)}
    (OUT / "timing.json").write_text(json.dumps({**timing, "cores": args.cores}) + "\n")
    log.info("rehearsal: %s", timing)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
