rule run_attack:
    input:
        unpack(attack_inputs),
    output:
        model=f"{RESULTS}/experiments/{{exp}}/model.pt",
        metrics=f"{RESULTS}/experiments/{{exp}}/metrics.json",
        history=f"{RESULTS}/experiments/{{exp}}/history.csv",
    log:
        f"{RESULTS}/logs/run_attack/{{exp}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/run_attack/{{exp}}.tsv"
    conda:
        ENV
    threads: config["compute"]["threads"]
    resources:
        gpu=GPU,
    params:
        settings=lambda wc: attack_settings(wc.exp),
        victims=lambda wc: attack_victims(wc.exp),
        workdir=lambda wc: f"{RESULTS}/experiments/{wc.exp}/work",
        code=attack_code,
    script:
        "../workflow/scripts/run_attack.py"
