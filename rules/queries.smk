rule collect_queries:
    input:
        data=rules.prepare_data.output.data,
        split=rules.split_data.output.split,
        victim=lambda wc: f"{RESULTS}/victims/{api_victim(wc)}/model.pt",
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
    conda:
        ENV
    threads: config["compute"]["threads"]
    resources:
        gpu=GPU,
    params:
        api=lambda wc: mc.api_settings(config, wc.api),
        victim=lambda wc: config["victims"][api_victim(wc)],
        compute=config["compute"],
        code=queries_code,
    script:
        "../workflow/scripts/collect_queries.py"
