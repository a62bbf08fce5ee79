"""Build results/table.csv and results/table.md from the metrics files."""

import sys
from pathlib import Path


sys.path.insert(0, str(Path(snakemake.scriptdir).resolve().parents[1] / "src"))



from mextract.report import load_metrics, results_table, to_markdown
from mextract.runtime import logged

with logged(snakemake.log[0]):
    df = results_table(load_metrics(snakemake.input.metrics))
    df.to_csv(snakemake.output.csv, index=False)
    victims = load_metrics(snakemake.input.victims)
    Path(snakemake.output.md).write_text(to_markdown(df, victims))
