"""Stage 3 (rules/base_model.smk): the base model of each configured model. `describe` reads what a
base folder offers (tokenizer family, BOS/EOS, context); `tiny` builds the demo's and rehearsal's
tiny LLaMA; `gguf` converts a GGUF file (`smollm2`: the pinned SmolLM2 one) into a base folder.
"""
