"""Build results/table.{csv,md,tex} and the report's HTML table from the metrics files
(every seed of every experiment; the tables aggregate the seeds), and, where the rule
declares the output ``seeds_csv``, results/table_seeds.csv with one row per seed."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).resolve().parents[1] / "src"))

from mextract.runtime import quick_imports

with quick_imports():  # no garbage collection while the imports load
    from mextract.report import (
        load_metrics,
        load_reference,
        results_table,
        seeds_table,
        table_notes,
        to_html,
        to_latex,
        to_markdown,
        victims_table,
    )
    from mextract.io import write_text
    from mextract.runtime import logged

with logged(snakemake.log[0]):
    reference = load_reference(snakemake.input.reference)
    metrics = load_metrics(snakemake.input.metrics)
    df = results_table(metrics, reference)
    victims = victims_table(load_metrics(snakemake.input.victims), reference)
    notes = table_notes(snakemake.params.dataset, snakemake.params.title, reference)
    write_text(df.to_csv(index=False), snakemake.output.csv)
    seeds_csv = snakemake.output.get("seeds_csv")
    if seeds_csv:
        write_text(seeds_table(metrics).to_csv(index=False), seeds_csv)
    write_text(to_markdown(df, victims, notes), snakemake.output.md)
    write_text(to_latex(df, victims, notes), snakemake.output.tex)
    write_text(to_html(df, victims, notes, title=f"Results: {snakemake.params.title}"),
               snakemake.output.html)
