"""Stage 6 (rules/evaluate.smk): held-out answers from every model (`heldout`, `generation`), the
judge's 1-4 scores (`judge`, with `rubric_judge` as its no-LLM backend) and the summary; `ask`
puts one question to a checkpoint from the command line.
"""
