"""Rule release: the PhysioNet release folder."""

from asclepius_r.logs import setup_logging

setup_logging(snakemake.log[0])

from pathlib import Path

from asclepius_r.release.folder import build_release

inputs, params = snakemake.input, snakemake.params
files = {
    "mimiciii_discharge.csv": inputs.dataset,
    "heldout_row_ids.txt": inputs.heldout_ids,
    "llm_archive/instructions.jsonl": params.llm_archive,
    "llm_archive/judge.jsonl": params.judge_archive,
    "evaluation/summary.json": inputs.summary,
    "evaluation/scores_per_model.tsv": inputs.per_model,
    "evaluation/scores_per_task.tsv": inputs.per_task,
    "evaluation/judge_stats.json": inputs.judge_stats,
    "evaluation/judge_verdicts.jsonl": inputs.verdicts,
    **{f"training_metrics/{Path(path).name}": path for path in inputs.metrics},
}
build_release(
    snakemake.output[0],
    checkpoints={Path(folder).name: folder for folder in inputs.pretrained + inputs.finetuned},
    files=files,
    config=snakemake.config,
    source_root=params.source_root,
    inputs={name: inputs[name] for name in params.input_names},
)
