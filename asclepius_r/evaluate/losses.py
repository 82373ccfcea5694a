"""Held-out losses of a model (rule heldout_losses): what pretraining and fine-tuning optimise,
measured on what neither trained on, so that a run shows whether each stage taught anything.

- Note perplexity: each held-out note framed by the base's BOS and EOS as pretraining frames a
  note, its first `max_length` tokens scored as one context; exp of the mean next-token loss over
  every predicted token.
- Answer loss: each held-out question's reference answer, teacher-forced after the released
  template with its note and question, exactly as fine-tuning builds an example
  (`train.finetune.encode_example`: the prompt led by the base's BOS, the answer and EOS the only
  labels); the mean loss per answer token. Nothing is dropped: a note too long is cut as the
  evaluation prompts are (`drop` as `note_middle`).

Greedy answers and their ROUGE-L and judge scores say how a model answers; these two say how
likely it finds the text and the reference, and move long before the answers do.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch

from asclepius_r.evaluate.heldout import heldout_items
from asclepius_r.files import write_json
from asclepius_r.notes.stage import read_notes

log = logging.getLogger(__name__)


def _summed_loss(model, ids: list[int], labels: list[int]) -> tuple[float, int]:
    """(summed next-token loss, predicted tokens) of one sequence; labels of -100 are not scored."""
    input_ids = torch.tensor([ids], device=model.device)
    targets = torch.tensor([labels], device=model.device)
    logits = model(input_ids=input_ids).logits.float()
    loss = torch.nn.functional.cross_entropy(
        logits[0, :-1], targets[0, 1:], ignore_index=-100, reduction="sum"
    )  # the model predicts token t+1 at position t
    return loss.item(), int((targets[0, 1:] != -100).sum())


@torch.inference_mode()
def note_loss(model, tokenizer, texts: list[str], max_length: int) -> tuple[float, int]:
    """(mean loss per predicted token, predicted tokens) over the notes `texts`."""
    total, count = 0.0, 0
    encoded = tokenizer(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    for ids in encoded:
        framed = [tokenizer.bos_token_id, *ids, tokenizer.eos_token_id][:max_length]
        loss, tokens = _summed_loss(model, framed, framed)
        total, count = total + loss, count + tokens
    return total / max(count, 1), count


@torch.inference_mode()
def answer_loss(model, tokenizer, items: list[dict], max_length: int, policy: str) -> tuple[float | None, int, int]:
    """(mean loss per answer token, answer tokens with EOS, items left out) over held-out `items`.

    An item whose template, question and answer alone exceed `max_length` cannot be scored as
    fine-tuning would have trained it: it is left out and counted (the mean is None if none is left).
    """
    from asclepius_r.train.finetune import encode_example

    cut = "note_middle" if policy == "drop" else policy
    total, count, left_out = 0.0, 0, 0
    for item in items:
        example, _ = encode_example(tokenizer, item["note"], item["question"], item["reference"], max_length, cut)
        if example is None:
            left_out += 1
            continue
        loss, tokens = _summed_loss(model, list(example.input_ids), example.labels.tolist())
        total, count = total + loss, count + tokens
    return (total / count if count else None), count, left_out


def heldout_losses(
    model_dir,
    notes_path,
    records_path,
    out,
    *,
    max_length: int,
    truncation: str,
    job: str | None = None,
    gpus: int = 1,
    cpu_fallback: bool = False,
) -> dict:
    """The model's held-out note perplexity and answer loss, written to `out` (JSON), on a claimed
    GPU (on the CPU where torch sees none only with `cpu_fallback`)."""
    from asclepius_r.evaluate.generation import load_for_generation
    from asclepius_r.gpus import claim_for_job

    notes = [n["text"] for n in read_notes(notes_path)]
    items = heldout_items(notes_path, records_path)
    with claim_for_job(job or f"heldout_losses-{Path(model_dir).name}", gpus, cpu_fallback=cpu_fallback) as claim:
        model, tokenizer = load_for_generation(str(model_dir), claim.torch_device() if claim else "cpu")
        length = min(max_length, model.config.max_position_embeddings)
        notes_mean, note_tokens = note_loss(model, tokenizer, notes, length)
        answers_mean, answer_tokens, too_long = answer_loss(model, tokenizer, items, length, truncation)
    if too_long:
        log.warning(
            "%s: %d of %d held-out answers left out of the answer loss: their template, question and answer "
            "alone exceed %d tokens (evaluate.loss_max_length or the base's context)",
            model_dir,
            too_long,
            len(items),
            length,
        )
    result = {
        "note_perplexity": math.exp(notes_mean),
        "note_loss": notes_mean,
        "notes": len(notes),
        "note_tokens": note_tokens,
        "answer_loss": answers_mean,
        "answers": len(items) - too_long,
        "answers_too_long": too_long,
        "answer_tokens": answer_tokens,
        "max_length": length,
        "truncation": truncation,
    }
    write_json(out, result)
    log.info("%s: held-out losses %s", model_dir, result)
    return result
