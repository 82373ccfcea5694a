# Stage 7: the PhysioNet release folder: checkpoints with model cards, the dataset, the LLM
# archives, evaluation tables, training logs, the workflow archive, a manifest and SHA256SUMS.
# The data inputs whose hashes the manifest records: the notes file and the base models.
DATA_INPUTS = ["noteevents", *(f"base_model_{size}" for size in SIZES)]


rule release:
    input:
        unpack(
            lambda wildcards: {
                "noteevents": noteevents_path(wildcards),
                **{f"base_model_{size}": base_model_dir(SimpleNamespace(size=size)) for size in SIZES},
            }
        ),
        pretrained=[pretrained_dir(size) for size in SIZES],
        finetuned=[finetuned_dir(size) for size in SIZES],
        dataset="results/mimiciii_discharge.csv",
        heldout_ids="results/notes/heldout_row_ids.txt",
        summary="results/evaluation/summary.json",
        per_model="results/evaluation/scores_per_model.tsv",
        per_task="results/evaluation/scores_per_task.tsv",
        judge_stats="results/evaluation/judge/stats.json",
        verdicts="results/evaluation/judge/verdicts.jsonl",
        metrics=expand("results/metrics/{stage}-{size}.jsonl", stage=["pretrain", "finetune"], size=SIZES),
    output:
        directory("release"),
    log:
        "logs/release/release.log",
    conda:
        "../envs/data.yaml"
    params:
        config=determining(""),
        source_root=workflow.basedir,
        # The archives are appended to by their stages, never made by a rule: read, not tracked.
        llm_archive=config["llm"]["archive"],
        judge_archive=config["judge"]["archive"],
        input_names=DATA_INPUTS,
    script:
        "../scripts/release.py"
