rule train_victim:
    input:
        data=rules.prepare_data.output.data,
        split=rules.split_data.output.split,
        device_ok=DEVICE_OK,
    output:
        model=f"{RESULTS}/victims/{{victim}}/model.pt",
        test_pred=f"{RESULTS}/victims/{{victim}}/test_predictions.pt",
        metrics=f"{RESULTS}/victims/{{victim}}/metrics.json",
        history=f"{RESULTS}/victims/{{victim}}/history.csv",
    log:
        f"{RESULTS}/logs/train_victim/{{victim}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/train_victim/{{victim}}.tsv"
    conda:
        ENV
    threads: config["compute"]["threads"]
    resources:
        gpu=GPU,
    params:
        victim=lambda wc: config["victims"][wc.victim],
        seed=lambda wc: config["victims"][wc.victim]["seed"],
        compute=config["compute"],
        checkpoint=lambda wc: f"{RESULTS}/victims/{wc.victim}/checkpoint.pt",
        code=fingerprint("victim"),
    script:
        "../workflow/scripts/train_victim.py"
