"""Benchmark: the recipe's choices decided by what the model learns (the learning check's figures).

From a finished learning check (`python -m learning.run`, its working folder), each variant
trains one stage again in this process, with the check's data, settings and seed and one choice
changed, and is measured as rule heldout_losses measures (held-out note perplexity for
pretraining, held-out answer loss for fine-tuning), against the check's own model as baseline:

- `bf16_handoff`: fine-tuning starts from the Pretrained-Only weights rounded to bf16 (what
  `pretrain.save_dtype: bfloat16` exports from the same fp32 master weights) instead of fp32;
- `across_notes`: pretraining with `note_attention: across_notes` (2023's) instead of the
  default `within_note`;
- `note_tail`: fine-tuning with that truncation policy instead of `note_middle` (at the check's
  max_length every demo note is cut; `drop` would train nothing there, so it is compared by
  bench/truncation_learning.py, at a length where about half the examples fit).

Run-to-run noise is the spread between two training seeds of the check itself
(`python -m learning.run --seed 1` and `--seed 2`); a difference inside it decides nothing.

    python bench/learning_recipe.py [--workdir learning/workdir] [--variants bf16_handoff across_notes ...]
Ends with one RESULT line.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import tempfile
from pathlib import Path

from learning import run as learning

log = logging.getLogger("bench.learning_recipe")


def bf16_copy(model_dir: Path, out: Path) -> Path:
    """The checkpoint with its weights rounded to bf16 and everything else unchanged."""
    import torch
    from transformers import AutoModelForCausalLM

    shutil.copytree(model_dir, out, ignore=shutil.ignore_patterns("*.safetensors", "*.safetensors.index.json"))
    AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).save_pretrained(out)
    return out


def variant(name: str, workdir: Path, scratch: Path) -> dict:
    """The held-out figures of one variant (or why it could not train)."""
    pretrained = workdir / "results/models" / learning.PRETRAINED
    if name == "bf16_handoff":
        base = bf16_copy(pretrained, scratch / "pretrained-bf16")
        model = learning.retrain(workdir, "finetune", scratch / name, base_model=str(base))
    elif name == "across_notes":
        model = learning.retrain(workdir, "pretrain", scratch / name, note_attention="across_notes")
    elif name == "note_tail":
        model = learning.retrain(workdir, "finetune", scratch / name, truncation=name)
    else:
        raise ValueError(f"unknown variant {name!r}")
    return learning.heldout_figures(workdir, model, scratch / f"{name}.json")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=learning.WORKDIR)
    parser.add_argument("--variants", nargs="+", default=["bf16_handoff", "across_notes", "note_tail"])
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    baseline = learning.figures(args.workdir)
    result = {
        "answer_loss_fp32_handoff": baseline["answer_loss_asclepius"],
        "heldout_ppl_within_note": baseline["heldout_ppl_pretrained"],
    }
    with tempfile.TemporaryDirectory(dir=args.workdir / "results") as scratch:
        for name in args.variants:
            figures = variant(name, args.workdir, Path(scratch))
            log.info("%s: %s", name, json.dumps(figures))
            if name == "across_notes":
                result["heldout_ppl_across_notes"] = figures["note_perplexity"]
            else:
                result[f"answer_loss_{name}"] = figures["answer_loss"]
    print("RESULT " + " ".join(f"{key}={value:.4f}" for key, value in result.items()))


if __name__ == "__main__":
    main()
