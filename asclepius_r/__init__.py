"""Asclepius-R reproduction: every stage of the workflow as an importable, testable function.

Stages (one module each): notes -> instructions -> base_model -> pretrain -> finetune ->
evaluate -> release. The Snakemake rules in ../rules call these through thin scripts.
"""

__version__ = "0.1.0"
