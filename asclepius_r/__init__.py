"""Asclepius-R reproduction: every stage of the workflow as an importable, testable package.

One subpackage per stage, mirroring rules/: notes -> instructions (through llm) -> base_model ->
train (pretrain, finetune) -> evaluate -> release, with plan and report beside them. They stand on
a ground floor that imports no stage: config, errors, files, logs, prompts, rouge and gpus.
"""
