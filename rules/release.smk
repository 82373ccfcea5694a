# Stage 7: the PhysioNet release folder with checksums.


rule release:
    input:
        pretrained=[pretrained_dir(size) for size in SIZES],
        finetuned=[finetuned_dir(size) for size in SIZES],
        dataset="results/mimiciii_discharge.csv",
        heldout_ids="results/notes/heldout_row_ids.txt",
    output:
        directory("release"),
    log:
        "logs/release/release.log",
    conda:
        "../envs/data.yaml"
    script:
        "../scripts/release.py"
