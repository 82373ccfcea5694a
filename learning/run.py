"""`make learning-check`: SmolLM2-135M-Instruct through the workflow's own rules on the demo's
notes and hand-written questions and answers, then the check that each stage taught it something.

Runs Snakemake with learning/config.yaml (alone: its one model is `smol`, base `smollm2`) in its
own working folder, learning/workdir/, for the held-out losses, answers, judge scores and report
pages of Base-smol, Asclepius-R-smol-Pretrained-Only and Asclepius-R-smol. It fails unless
Pretrained-Only's held-out note perplexity and Asclepius-R's held-out answer loss are each below
the base's by the margins below, measured to be well outside run-to-run noise (BENCHMARKS.md,
"Learning check"). It ends with one line:

    RESULT heldout_ppl_base=.. heldout_ppl_pretrained=.. answer_loss_base=.. answer_loss_asclepius=.. ...

    python -m learning.run [--gpu] [--cores N] [--seed N] [--workdir DIR] [SNAKEMAKE ARGS...]

`--gpu` lays learning/gpu.yaml over the config (whole epochs at the paper's lengths, bf16, on one
GPU, in learning/workdir-gpu/ by default): the same check at a budget only a GPU gives.

`--seed` is the training stages' own seed (pretrain.seed, finetune.seed: the order of their
data); the notes, dataset and held-out split stay the demo's, so two seeds measure the noise of
training alone. A rerun with the same seed reruns nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

from asclepius_r import config as workflow_config
from asclepius_r.base_model.smollm2 import fetch_gguf

log = logging.getLogger("learning")

REPO = Path(__file__).resolve().parents[1]
WORKDIR = REPO / "learning" / "workdir"
GPU_WORKDIR = REPO / "learning" / "workdir-gpu"
NAME = "smol"
BASE, PRETRAINED, FINETUNED = f"Base-{NAME}", f"Asclepius-R-{NAME}-Pretrained-Only", f"Asclepius-R-{NAME}"
OVERLAY = Path("results/learning/overlay.yaml")
TARGETS = ["results/evaluation/summary.json", "results/report/evaluation.html", "results/report/answers.html"]
# The smallest drops that pass, relative to the base: each well below what the recipe gives and
# far outside the spread of two training seeds (BENCHMARKS.md, "Learning check").
MIN_PERPLEXITY_DROP = 0.15
MIN_ANSWER_LOSS_DROP = 0.05


def figures(workdir: Path) -> dict:
    """The held-out losses and answer scores of the base, Pretrained-Only and Asclepius-R."""
    summary = json.loads((workdir / "results/evaluation/summary.json").read_text())
    losses = {m: json.loads((workdir / f"results/evaluation/losses/{m}.json").read_text()) for m in summary}
    return {
        "heldout_ppl_base": losses[BASE]["note_perplexity"],
        "heldout_ppl_pretrained": losses[PRETRAINED]["note_perplexity"],
        "answer_loss_base": losses[BASE]["answer_loss"],
        "answer_loss_asclepius": losses[FINETUNED]["answer_loss"],
        "heldout_ppl_asclepius": losses[FINETUNED]["note_perplexity"],
        "answer_loss_pretrained": losses[PRETRAINED]["answer_loss"],
        **{f"rouge_l_{key}": summary[m]["rouge_l"] for key, m in _SHORT.items()},
        **{f"judge_{key}": summary[m]["judge_score"] for key, m in _SHORT.items()},
    }


_SHORT = {"base": BASE, "pretrained": PRETRAINED, "asclepius": FINETUNED}


def failures(result: dict) -> list[str]:
    """What says learning failed: a held-out figure not below the base's by its margin."""
    problems = []
    ppl_limit = (1 - MIN_PERPLEXITY_DROP) * result["heldout_ppl_base"]
    if not result["heldout_ppl_pretrained"] <= ppl_limit:
        problems.append(
            f"pretraining did not learn: held-out note perplexity {result['heldout_ppl_pretrained']:.3f} after it, "
            f"{result['heldout_ppl_base']:.3f} before (needs <= {ppl_limit:.3f}, a {MIN_PERPLEXITY_DROP:.0%} drop)"
        )
    loss_limit = (1 - MIN_ANSWER_LOSS_DROP) * result["answer_loss_base"]
    if not result["answer_loss_asclepius"] <= loss_limit:
        problems.append(
            f"fine-tuning did not learn: held-out answer loss {result['answer_loss_asclepius']:.4f} after it, "
            f"{result['answer_loss_base']:.4f} for the base "
            f"(needs <= {loss_limit:.4f}, a {MIN_ANSWER_LOSS_DROP:.0%} drop)"
        )
    return problems


def resolved_config(workdir: Path = WORKDIR) -> dict:
    """learning/config.yaml with the run's overlay (the archive's path, the seed, the GPU budget), as
    Snakemake read it."""
    config = yaml.safe_load((REPO / "learning/config.yaml").read_text())
    overlay = yaml.safe_load((workdir / OVERLAY).read_text())
    return workflow_config.resolve(workflow_config.merge(config, overlay))


def retrain(workdir: Path, stage: str, out: Path, base_model: str | None = None, **overrides) -> Path:
    """Train `stage` again in this process as the check's rule did (its data, settings and seed),
    with `overrides` over its settings and from `base_model` (default: the rule's own input), into
    `out`; for variants of the recipe and the broken-recipe test. Paths in `workdir` are absolute."""
    from asclepius_r.train import finetune, pretrain
    from asclepius_r.train.launch import prepare_run
    from asclepius_r.train.run import TrainRun

    results = workdir.resolve() / "results"
    inputs = {
        "pretrain": (results / "base_models" / NAME, results / "notes/discharge.parquet"),
        "finetune": (results / "models" / PRETRAINED, results / "mimiciii_discharge.csv"),
    }[stage]
    run = TrainRun.from_config(
        resolved_config(workdir),
        stage,
        NAME,
        base_model=str(base_model or inputs[0]),
        data=str(inputs[1]),
        output_dir=str(out / "model"),
        checkpoint_dir=str(out / "checkpoints"),
        metrics_file=str(out / "metrics.jsonl"),
        truncation_file=None,
        data_cache_dir=None,
    )
    run = dataclasses.replace(run, **overrides)
    run_file = prepare_run(stage, run)
    (finetune if stage == "finetune" else pretrain).main(str(run_file))
    return out / "model"


def heldout_figures(workdir: Path, model_dir: Path, out: Path, max_length: int | None = None) -> dict:
    """A model's held-out note perplexity and answer loss, measured as rule heldout_losses does
    (at `max_length` instead of the check's evaluate.loss_max_length where given)."""
    from asclepius_r.evaluate.heldout import truncation_policy
    from asclepius_r.evaluate.losses import heldout_losses

    config, results = resolved_config(workdir), workdir.resolve() / "results"
    return heldout_losses(
        model_dir,
        results / "notes/heldout.parquet",
        results / "instructions/heldout.jsonl",
        out,
        max_length=max_length or config["evaluate"]["loss_max_length"],
        truncation=truncation_policy(config, FINETUNED),
        gpus=0,
    )


def result_line(result: dict) -> str:
    return "RESULT " + " ".join(f"{key}={value:.4f}" for key, value in result.items())


def write_overlay(workdir: Path, gpu: bool = False, seed: int | None = None) -> Path:
    """The run's layer over learning/config.yaml, in `workdir`: the demo archive's path, the GPU
    budget (learning/gpu.yaml) with `gpu`, and the training stages' `seed` where given."""
    # The demo's archive lies in the checkout, not in the working folder.
    layer = {"llm": {"archive": str(REPO / "demo" / "llm_archive.jsonl")}}
    if gpu:
        layer = workflow_config.merge(yaml.safe_load((REPO / "learning" / "gpu.yaml").read_text()), layer)
    if seed is not None:
        layer = workflow_config.merge(layer, {"pretrain": {"seed": seed}, "finetune": {"seed": seed}})
    overlay = workdir / OVERLAY
    overlay.parent.mkdir(parents=True, exist_ok=True)
    overlay.write_text(yaml.safe_dump(layer))
    return overlay


def snakemake_command(cores: str, snakemake_args: list[str]) -> list[str]:
    """The workflow's Snakemake on learning/config.yaml and the overlay, run in the working folder."""
    command = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", "."]
    command += ["--configfile", str(REPO / "learning" / "config.yaml"), str(OVERLAY)]
    return command + ["--cores", cores, "--resources", "gpu=1", "--show-failed-logs", *snakemake_args, "--", *TARGETS]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cores", default="2")
    parser.add_argument("--seed", type=int, default=None, help="the training stages' seed (default: the config's)")
    parser.add_argument("--gpu", action="store_true", help="the GPU budget (learning/gpu.yaml)")
    parser.add_argument("--workdir", type=Path, default=None, help="default: learning/workdir(-gpu)")
    args, snakemake_args = parser.parse_known_args(argv)
    args.workdir = args.workdir or (GPU_WORKDIR if args.gpu else WORKDIR)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    fetch_gguf()  # once, into the cache; the rule then converts it
    args.workdir.mkdir(parents=True, exist_ok=True)
    os.chdir(args.workdir)
    write_overlay(Path("."), gpu=args.gpu, seed=args.seed)
    command = snakemake_command(args.cores, snakemake_args)
    started = time.monotonic()
    log.info("%s", " ".join(command))
    done = subprocess.run(command, env={**os.environ, "PYTHONPATH": str(REPO)})
    if done.returncode:
        return done.returncode
    result = figures(Path("."))
    problems = failures(result)
    for problem in problems:
        log.error("%s", problem)
    log.info("learning check: %s in %.0f s", "FAILED" if problems else "passed", time.monotonic() - started)
    print(result_line(result))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
