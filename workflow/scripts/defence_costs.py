"""What each API of the defence matrix costs honest users (accuracy of its answers on
the test set, labels changed, L1 distortion of soft answers) and PRADA's false-positive
rate on simulated honest clients sending test images."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).resolve().parents[1] / "src"))

from mextract.runtime import quick_imports

with quick_imports():  # no garbage collection while the imports load
    from mextract.data import load_dataset
    from mextract.detection import benign_fpr
    from mextract.experiment import (
        api_honest_accuracy,
        api_input,
        load_defence_models,
        load_victim,
        prada_kwargs,
    )
    from mextract.io import load_artifact, write_json
    from mextract.runtime import eprint, logged, setup

with logged(snakemake.log[0]):
    compute = setup(snakemake.params.compute, snakemake.threads)
    data = load_dataset(snakemake.input.data)
    k = len(data["classes"])
    names = list(snakemake.params.victims)
    victims = {v: load_victim(p, snakemake.params.victims[v], k)
               for v, p in zip(names, snakemake.input.victims, strict=True)}
    files = list(snakemake.input.defence_models)
    out = {"apis": {}}
    for name, api in snakemake.params.apis.items():
        mine = [f for f in files if Path(f).parent.name == api["victim"]]
        models = load_defence_models(mine, api["defences"], k)
        cost = api_honest_accuracy(victims[api["victim"]], api, data["x_test"],
                                   data["y_test"], compute, models)
        out["apis"][name] = {**cost, "defences": api["defences"], "mode": api["mode"],
                             "victim": api["victim"]}
        eprint(f"{name}: honest accuracy {cost['api_honest_accuracy']:.4f}")
    d = snakemake.params.detection
    pred = load_artifact(snakemake.input.predictions[0])["pred"]
    out["fpr"] = benign_fpr(api_input(data["x_test"]), pred, clients=d["clients"],
                            queries_per_client=d["queries_per_client"], seed=d["seed"],
                            **prada_kwargs(d))
    out["fpr"]["victim"] = names[0]
    eprint(f"PRADA benign FPR: {out['fpr']}")
    write_json(out, snakemake.output.costs)
