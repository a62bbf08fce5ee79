rule collect_queries:
    input:
        # the victim's weights (none for a served API, `apis.<name>.url`)
        unpack(lambda wc: mc.api_victim_inputs(config, wc.api)),
        data=rules.prepare_data.output.data,
        device_ok=DEVICE_OK,
        split=rules.split_data.output.split,
        defence_models=lambda wc: mc.defence_model_files(config, wc.api),
    output:
        cache=f"{RESULTS}/queries/{{api}}/{{qset}}.pt",
        # the defender's DAWN log of these answers (empty for an API without DAWN)
        watermark=f"{RESULTS}/queries/{{api}}/{{qset}}.watermark.pt",
    log:
        f"{RESULTS}/logs/collect_queries/{{api}}-{{qset}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/collect_queries/{{api}}-{{qset}}.tsv"
    wildcard_constraints:
        qset=r"[^/]+(?<!\.watermark)",
    # first among the ready jobs: the attacks that wait for it can then fill every
    # core, instead of one of them running alone at the end
    priority: 1
    conda:
        ENV
    threads: config["compute"]["threads"]
    resources:
        gpu=GPU,
    params:
        api=lambda wc: mc.api_settings(config, wc.api),
        victim=lambda wc: config["victims"].get(api_victim(wc)),
        compute=config["compute"],
        code=queries_code,
    script:
        "../workflow/scripts/collect_queries.py"
