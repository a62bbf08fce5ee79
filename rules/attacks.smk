rule run_attack:
    input:
        unpack(attack_inputs),
        device_ok=DEVICE_OK,
    output:
        model=f"{RESULTS}/experiments/{{exp}}/seed{{seed}}/model.pt",
        metrics=f"{RESULTS}/experiments/{{exp}}/seed{{seed}}/metrics.json",
        history=f"{RESULTS}/experiments/{{exp}}/seed{{seed}}/history.csv",
    log:
        f"{RESULTS}/logs/run_attack/{{exp}}-seed{{seed}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/run_attack/{{exp}}-seed{{seed}}.tsv"
    wildcard_constraints:
        seed=r"\d+",
    conda:
        ENV
    threads: config["compute"]["threads"]
    resources:
        gpu=GPU,
    params:
        settings=lambda wc: mc.attack_settings(config, wc.exp, int(wc.seed)),
        victims=lambda wc: mc.attack_victims(config, wc.exp),
        workdir=lambda wc: f"{mc.experiment_dir(wc.exp, wc.seed)}/work",
        code=attack_code,
    script:
        "../workflow/scripts/run_attack.py"


# An experiment whose jobs would compute exactly what an earlier one's do (the study's
# per-stage controls; two equal-budget random baselines of one API): its results are
# that experiment's, copied and relabelled, not trained again.
ruleorder: reuse_attack > run_attack


rule reuse_attack:
    input:
        unpack(twin_files),
    output:
        model=f"{RESULTS}/experiments/{{exp}}/seed{{seed}}/model.pt",
        metrics=f"{RESULTS}/experiments/{{exp}}/seed{{seed}}/metrics.json",
        history=f"{RESULTS}/experiments/{{exp}}/seed{{seed}}/history.csv",
    log:
        f"{RESULTS}/logs/reuse_attack/{{exp}}-seed{{seed}}.log",
    wildcard_constraints:
        exp=TWIN_NAMES,
        seed=r"\d+",
    localrule: True
    conda:
        ENV
    params:
        twin=lambda wc: TWINS[wc.exp],
        labels=lambda wc: mc.experiment_labels(config, wc.exp),
        code=fingerprint("io"),
    script:
        "../workflow/scripts/reuse_attack.py"
