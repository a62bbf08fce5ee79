"""Give an experiment the results of its twin (an earlier experiment whose jobs compute
exactly the same, mextract.config.twins): the same weights and history, its metrics
relabelled with this experiment's name, stage and baseline links."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).resolve().parents[1] / "src"))

from mextract.runtime import quick_imports

with quick_imports():  # no garbage collection while the imports load
    from mextract.io import copy_artifact, read_json, write_json, write_text
    from mextract.runtime import eprint, logged

with logged(snakemake.log[0], f"experiments.{snakemake.wildcards.exp}"):
    twin = snakemake.params.twin
    copy_artifact(snakemake.input.model, snakemake.output.model)
    write_text(Path(snakemake.input.history).read_text(), snakemake.output.history)
    metrics = {**read_json(snakemake.input.metrics), **snakemake.params.labels,
               "same_as": twin}
    write_json(metrics, snakemake.output.metrics)
    eprint(f"{snakemake.wildcards.exp}: the results of {twin} (the same job settings)")
