"""Stage 7 (rules/release.smk): the PhysioNet release folder, its checks and restoring it (`folder`)."""
