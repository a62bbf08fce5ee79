rule make_table:
    input:
        metrics=experiment_metrics(),
        victims=expand(
            f"{RESULTS}/victims/{{victim}}/metrics.json", victim=used_victims()
        ),
    output:
        csv=f"{RESULTS}/table.csv",
        md=f"{RESULTS}/table.md",
    log:
        f"{RESULTS}/logs/make_table.log",
    conda:
        ENV
    params:
        experiments=list(config["experiments"]),
        victims=used_victims(),
        dataset=config["dataset"]["name"],
    script:
        "../workflow/scripts/make_table.py"


onsuccess:
    table = Path(RESULTS) / "table.md"
    if table.exists():
        print(f"\nResults table ({table}):\n")
        print(table.read_text())
