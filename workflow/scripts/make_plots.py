"""Figures of one stage (rule plot_stage) or of the victims' training (plot_victims)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).resolve().parents[1] / "src"))

from mextract.runtime import quick_imports

with quick_imports():  # no garbage collection while the imports load
    import pandas as pd

    from mextract import plots
    from mextract.report import load_metrics, load_reference, results_table
    from mextract.runtime import logged

with logged(snakemake.log[0]):
    reference = load_reference(snakemake.input.reference)
    metrics = load_metrics(snakemake.input.metrics)
    # one history per metrics file (every seed of every experiment), in the same order
    runs = list(zip(metrics, [pd.read_csv(p) for p in snakemake.input.history], strict=True))
    out = snakemake.output
    if snakemake.rule == "plot_victims":
        plots.victim_training(runs, [out.png, out.svg], reference)
    else:
        stage = int(snakemake.wildcards.stage)
        runs.sort(key=lambda r: r[0]["strategy"] != "control")  # as in the table
        plots.fidelity_vs_queries(runs, stage, [out.fidelity_png, out.fidelity_svg])
        table = results_table(metrics, reference)  # one row per experiment, seeds aggregated
        plots.accuracy_fidelity_bars(table, stage, [out.bars_png, out.bars_svg])
