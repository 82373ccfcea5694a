"""The Snakemake HTML report (rules/report.smk): figures and tables of every stage (`figures`)."""
