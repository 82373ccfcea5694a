# The plan (what the run will cost, take and need, per stage), the preflight that checks it
# against this machine before the first GPU or paid job, and the report page that puts the
# plan beside what the run then used. `make plan` prints the same plan without Snakemake.


rule plan:
    input:
        notes="results/notes/discharge.parquet",
        heldout="results/notes/heldout.parquet",
        # Training tokens are counted with each model's base tokenizer.
        base=lambda wildcards: [base_model_dir(SimpleNamespace(size=s)) for s in SIZES],
    output:
        "results/plan/plan.json",
    log:
        "logs/plan/plan.log",
    conda:
        "../envs/train.yaml"
    params:
        config=determining(""),
    script:
        "../scripts/plan.py"


rule report_plan:
    input:
        plan="results/plan/plan.json",
        records=expand("results/instructions/{split}.jsonl", split=["discharge", "heldout"]),
        instruction_stats=expand("results/instructions/{split}.stats.json", split=["discharge", "heldout"]),
        judge_stats="results/evaluation/judge/stats.json",
        # Both lists in the order of params.names.
        models=[
            pretrained_dir(size) if stage == "pretrain" else finetuned_dir(size)
            for size in SIZES
            for stage in ("pretrain", "finetune")
        ],
        metrics=[f"results/metrics/{stage}-{size}.jsonl" for size in SIZES for stage in ("pretrain", "finetune")],
    output:
        report(
            "results/report/plan.html",
            caption="../report/plan.rst",
            category="0. Plan",
        ),
    log:
        "logs/report/plan.log",
    conda:
        "../envs/data.yaml"
    params:
        # The archives are appended to by their stages, never made by a rule: read, not tracked.
        llm_archive=config["llm"]["archive"],
        judge_archive=config["judge"]["archive"],
        names=[f"{stage} {size}" for size in SIZES for stage in ("pretrain", "finetune")],
    script:
        "../scripts/report_plan.py"


# After the DAG is built and before the first job; Snakemake skips it on dry runs.
onstart:
    run_preflight()
