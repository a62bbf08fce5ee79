"""The defence matrix's tables (CSV, Markdown) and figures (heatmap, utility plot)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).resolve().parents[1] / "src"))

from mextract.runtime import quick_imports

with quick_imports():  # no garbage collection while the imports load
    import json

    from mextract import matrix
    from mextract.io import write_text
    from mextract.report import load_metrics
    from mextract.runtime import logged

with logged(snakemake.log[0]):
    metrics = load_metrics(snakemake.input.metrics)
    costs = json.loads(Path(snakemake.input.costs).read_text())
    table = matrix.matrix_table(snakemake.params.cells, metrics, costs["apis"])
    summary = matrix.defence_summary(table, costs["apis"])
    detection = matrix.detection_table(load_metrics(snakemake.input.detection), costs["fpr"])
    out = snakemake.output
    write_text(table.to_csv(index=False), out.csv)
    write_text(summary.to_csv(index=False), out.summary)
    write_text(detection.to_csv(index=False), out.detection)
    write_text(matrix.to_markdown(table, summary, detection), out.md)
    matrix.heatmap(table, [out.heatmap, out.heatmap_svg])
    matrix.utility_plot(summary, [out.utility, out.utility_svg])
