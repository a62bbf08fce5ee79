"""Fidelity's reference for a served API: its answers on the test set (arg-max of soft
answers), asked once; the server counts them (evaluation queries, not an attack's)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).resolve().parents[1] / "src"))

from mextract.runtime import quick_imports

with quick_imports():  # no garbage collection while the imports load
    from mextract.data import load_dataset
    from mextract.experiment import make_api
    from mextract.io import save_artifact, write_json
    from mextract.metrics import agreement
    from mextract.runtime import eprint, logged, setup

with logged(snakemake.log[0]):
    compute = setup(snakemake.params.compute, 1)
    data = load_dataset(snakemake.input.data)
    api_cfg = {**snakemake.params.api, "budget": None}
    api = make_api(None, api_cfg, compute)
    answers = api.query(data["x_test"])
    pred = answers.argmax(dim=1) if answers.is_floating_point() else answers
    eprint(f"{api.queries} evaluation queries answered by {api_cfg['url']} ({api.description})")
    save_artifact({"pred": pred}, snakemake.output.test_pred)
    write_json({"api": snakemake.params.api["name"], "url": api_cfg["url"],
                "description": api.description, "server_fingerprint": api.spec()["server"],
                "evaluation_queries": api.queries,
                "test_accuracy": agreement(pred, data["y_test"])}, snakemake.output.metrics)
