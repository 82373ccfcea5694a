"""The plan (rules/plan.smk): what a run will cost, take and need before its first job (`estimate`,
from `inputs`, `llm_stages`, `gpu_stages`, `memory` and `disk`), the preflight that checks it
against this machine when Snakemake starts (`preflight`), and the plan beside what the run used
(`usage`, `table`).
"""
