# The defence matrix (config key `matrix`): its cells are ordinary run_attack jobs
# (experiments mx.<defence>.<attack>); these rules train the defences' own models,
# measure what each defence costs honest users, and build the matrix's tables and
# figures.


localrules:
    make_matrix,


rule train_defence_model:
    input:
        data=rules.prepare_data.output.data,
        split=rules.split_data.output.split,
        victim=f"{RESULTS}/victims/{{victim}}/model.pt",
        device_ok=DEVICE_OK,
    output:
        model=f"{RESULTS}/defence_models/{{victim}}/{{key}}.pt",
    log:
        f"{RESULTS}/logs/train_defence_model/{{victim}}-{{key}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/train_defence_model/{{victim}}-{{key}}.tsv"
    # first among the ready jobs: the attacks that wait for it can then fill every
    # core, instead of one of them running alone at the end
    priority: 1
    conda:
        ENV
    threads: config["compute"]["threads"]
    resources:
        gpu=GPU,
    params:
        spec=lambda wc: mc.defence_model_specs(config)[wc.key],
        victim=lambda wc: config["victims"][wc.victim],
        compute=config["compute"],
        seed=lambda wc: config["victims"][wc.victim]["seed"],
        code=fingerprint("defence_models", "experiment"),
    script:
        "../workflow/scripts/train_defence_model.py"


rule defence_costs:
    input:
        unpack(lambda wc: mc.cost_inputs(config)),
        device_ok=DEVICE_OK,
    output:
        costs=f"{RESULTS}/matrix/costs.json",
    log:
        f"{RESULTS}/logs/defence_costs.log",
    benchmark:
        f"{RESULTS}/benchmarks/defence_costs.tsv"
    conda:
        ENV
    threads: config["compute"]["threads"]
    resources:
        gpu=GPU,
    params:
        apis=lambda wc: {a: mc.api_settings(config, a) for a in mc.matrix_apis(config)},
        victims=lambda wc: {v: config["victims"][v] for v in mc.matrix_victims(config)},
        detection=lambda wc: config["matrix"]["detection"],
        compute=config["compute"],
        code=fingerprint("experiment", "detection"),
    script:
        "../workflow/scripts/defence_costs.py"


rule make_matrix:
    input:
        metrics=lambda wc: mc.matrix_metric_files(config),
        detection=lambda wc: mc.experiment_files(
            config, "metrics.json", mc.detected_attacks(config)
        ),
        costs=rules.defence_costs.output.costs,
    output:
        csv=f"{RESULTS}/matrix.csv",
        summary=f"{RESULTS}/matrix_summary.csv",
        detection=f"{RESULTS}/matrix_detection.csv",
        md=f"{RESULTS}/matrix.md",
        heatmap=report(
            f"{RESULTS}/report/matrix_heatmap.png",
            caption="../report/matrix_heatmap.rst",
            category="Defence matrix",
            subcategory="fidelity gain over control",
            labels={"figure": "defence x attack heatmap"},
        ),
        heatmap_svg=f"{RESULTS}/report/matrix_heatmap.svg",
        utility=report(
            f"{RESULTS}/report/matrix_utility.png",
            caption="../report/matrix_utility.rst",
            category="Defence matrix",
            subcategory="utility against protection",
            labels={"figure": "utility against protection"},
        ),
        utility_svg=f"{RESULTS}/report/matrix_utility.svg",
    log:
        f"{RESULTS}/logs/make_matrix.log",
    conda:
        ENV
    params:
        cells=lambda wc: mc.matrix_cells(config),
        code=fingerprint("matrix"),
    script:
        "../workflow/scripts/make_matrix.py"
