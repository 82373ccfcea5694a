"""Stage 1 (rules/notes.smk): NOTEEVENTS.csv(.gz) -> discharge notes for training and held-out notes
for evaluation. `noteevents` reads the MIMIC-III file strictly; `stage` applies the note policies,
splits by patient and writes the two Parquet outputs.
"""
