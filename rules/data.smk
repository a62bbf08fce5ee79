rule prepare_data:
    output:
        data=f"{RESULTS}/data/dataset.pt",
    log:
        f"{RESULTS}/logs/prepare_data.log",
    benchmark:
        f"{RESULTS}/benchmarks/prepare_data.tsv"
    conda:
        ENV
    params:
        dataset=config["dataset"],
        code=fingerprint("data"),
    script:
        "../workflow/scripts/prepare_data.py"


rule split_data:
    input:
        data=rules.prepare_data.output.data,
    output:
        split=f"{RESULTS}/data/split.pt",
        summary=f"{RESULTS}/data/split.json",
    log:
        f"{RESULTS}/logs/split_data.log",
    conda:
        ENV
    params:
        split=config["split"],
        code=fingerprint("data"),
    script:
        "../workflow/scripts/split_data.py"
