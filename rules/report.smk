# Results people can read: per-stage figures, the results tables (CSV, Markdown,
# booktabs LaTeX, HTML) and the Snakemake report (snakemake --report results/report.html).
# Everything here is built from the metrics and history files only.


# Cheap rules run on the submitting host, never as cluster jobs (--executor slurm).
localrules:
    all,
    make_table,
    summarize_run,
    plot_stage,
    plot_victims,


report: "../report/workflow.rst"


rule plot_stage:
    input:
        metrics=lambda wc: stage_files(wc, "metrics.json"),
        history=lambda wc: stage_files(wc, "history.csv"),
        reference=REFERENCE,
    output:
        fidelity_png=report(
            f"{RESULTS}/report/stage{{stage}}_fidelity_vs_queries.png",
            caption="../report/fidelity_vs_queries.rst",
            category=lambda wc: stage_title(wc.stage),
            subcategory="fidelity against queries",
            labels={"stage": "{stage}", "figure": "fidelity against queries"},
        ),
        fidelity_svg=f"{RESULTS}/report/stage{{stage}}_fidelity_vs_queries.svg",
        bars_png=report(
            f"{RESULTS}/report/stage{{stage}}_accuracy_fidelity.png",
            caption="../report/accuracy_fidelity.rst",
            category=lambda wc: stage_title(wc.stage),
            subcategory="accuracy and fidelity",
            labels={
                "stage": "{stage}",
                "figure": "accuracy and fidelity beside the study",
            },
        ),
        bars_svg=f"{RESULTS}/report/stage{{stage}}_accuracy_fidelity.svg",
    log:
        f"{RESULTS}/logs/plot_stage/stage{{stage}}.log",
    wildcard_constraints:
        stage="[0-3]",
    conda:
        ENV
    params:
        experiments=lambda wc: mc.stage_experiments(config, wc.stage),
        code=fingerprint("report", "plots"),
    script:
        "../workflow/scripts/make_plots.py"


rule plot_victims:
    input:
        metrics=VICTIM_METRICS,
        history=expand(
            f"{RESULTS}/victims/{{victim}}/history.csv", victim=mc.used_victims(config)
        ),
        reference=REFERENCE,
    output:
        png=report(
            VICTIM_PLOTS[0],
            caption="../report/victims_training.rst",
            category=stage_title(0),
            subcategory="training curve",
            labels={"stage": "0", "figure": "victim training"},
        ),
        svg=VICTIM_PLOTS[1],
    log:
        f"{RESULTS}/logs/plot_victims.log",
    conda:
        ENV
    params:
        victims=mc.used_victims(config),
        code=fingerprint("report", "plots"),
    script:
        "../workflow/scripts/make_plots.py"


rule make_table:
    input:
        metrics=mc.experiment_files(
            config, "metrics.json", mc.table_experiments(config)
        ),
        victims=VICTIM_METRICS,
        reference=REFERENCE,
        # Not read: listed so that `rule all`, which asks for the table, also builds
        # every figure of the report.
        plots=[*STAGE_PLOTS, *VICTIM_PLOTS],
    output:
        csv=f"{RESULTS}/table.csv",
        seeds_csv=f"{RESULTS}/table_seeds.csv",
        md=f"{RESULTS}/table.md",
        tex=f"{RESULTS}/table.tex",
        html=report(
            f"{RESULTS}/report/table.html",
            caption="../report/table.rst",
            category="Results table",
            subcategory="all stages",
            labels={"table": "all stages, beside the study"},
        ),
    log:
        f"{RESULTS}/logs/make_table.log",
    conda:
        ENV
    params:
        experiments=mc.table_experiments(config),
        seeds=config["seeds"],
        victims=mc.used_victims(config),
        dataset=config["dataset"]["name"],
        title=config["title"],
        code=fingerprint("report"),
    script:
        "../workflow/scripts/make_table.py"


rule summarize_run:
    input:
        table=rules.make_table.output.md,
        matrix=MATRIX,
    output:
        md=f"{RESULTS}/summary.md",
    log:
        f"{RESULTS}/logs/summarize_run.log",
    conda:
        ENV
    params:
        title=config["title"],
        command=lambda wildcards, output: run_command(output.md),
        compute=config["compute"],
        seeds=config["seeds"],
        benchmarks=f"{RESULTS}/benchmarks",
        logs=f"{RESULTS}/logs",
        code=fingerprint("timings"),
    script:
        "../workflow/scripts/summarize_run.py"


onsuccess:
    table = Path(RESULTS) / "table.md"
    if table.exists():
        print(f"\nResults table ({table}):\n")
        print(table.read_text())


# The same page for the study's table alone (`snakemake results/summary_study.md`):
# the study's rows need not wait for the defence matrix, which takes about as long
# again on a CPU. Ask for it before the matrix's jobs start, so that its job count and
# wall time are the table's alone. Not part of `all`.
use rule summarize_run as summarize_study with:
    input:
        table=rules.make_table.output.md,
        matrix=[],
    output:
        md=f"{RESULTS}/summary_study.md",
    log:
        f"{RESULTS}/logs/summarize_study.log",
