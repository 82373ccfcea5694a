"""Answer generation with a trained checkpoint and the released template (batched, greedy)."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from .prompts import render_released


def load_for_generation(model_dir: str):
    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token  # batching needs a pad id; BOS would be wrong
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    model.to("cuda" if torch.cuda.is_available() else "cpu").eval()
    return model, tokenizer


@torch.inference_mode()
def generate_answers(
    model,
    tokenizer,
    pairs: list[tuple[str, str]],
    max_new_tokens: int = 400,
    batch_size: int = 8,
    max_prompt_tokens: int | None = None,
) -> list[str]:
    """Greedy answers for (note, question) pairs, in order."""
    answers = []
    for start in range(0, len(pairs), batch_size):
        prompts = [render_released(note, question) for note, question in pairs[start : start + batch_size]]
        batch = tokenizer(
            prompts,
            return_tensors="pt",
            padding=True,
            truncation=max_prompt_tokens is not None,
            max_length=max_prompt_tokens,
        ).to(model.device)
        output = model.generate(
            **batch,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        answers += tokenizer.batch_decode(output[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    return [a.strip() for a in answers]
