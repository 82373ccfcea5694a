"""The plan (rules/plan.smk): what a run will cost, take and need before its first job (`estimate`),
and the preflight that checks it against this machine when Snakemake starts (`preflight`).
"""
