"""Write results/summary.md: the command, the run's wall time and the results tables
(copied to docs/results/<config>.md for a committed run)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).resolve().parents[1] / "src"))

from mextract.runtime import quick_imports

with quick_imports():  # no garbage collection while the imports load
    from mextract.io import write_text
    from mextract.runtime import logged
    from mextract.timings import machine_description, run_summary

with logged(snakemake.log[0]):
    p = snakemake.params
    c = p.compute
    notes = [f"* Each job computed on `{c['device']}` with {c['threads']} threads "
             f"(compute.threads); substitute seeds {list(p.seeds)}.",
             f"* Machine (where this page was written, the run's own unless it was resumed "
             f"elsewhere): {machine_description()}."]
    tables = Path(snakemake.input.table).read_text()
    for extra in snakemake.input.matrix:  # the defence matrix, where the config has one
        tables = tables.rstrip() + "\n\n" + Path(extra).read_text()
    write_text(run_summary(p.title, p.command, tables, p.benchmarks, p.logs, notes),
               snakemake.output.md)
