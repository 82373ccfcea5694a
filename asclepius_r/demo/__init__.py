"""The embedded demo: a synthetic NOTEEVENTS.csv in the MIMIC-III schema, built from
discharge summaries written for this project, and the archive of hand-written LLM responses."""
