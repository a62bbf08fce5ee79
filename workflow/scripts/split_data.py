"""Write the victim / attacker-pool split of the training set as index tensors."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).resolve().parents[1] / "src"))

from mextract.runtime import quick_imports

with quick_imports():  # no garbage collection while the imports load
    from mextract.data import load_dataset, make_split
    from mextract.io import save_artifact, write_json
    from mextract.runtime import logged

with logged(snakemake.log[0]):
    data = load_dataset(snakemake.input.data)
    p = snakemake.params.split
    split = make_split(len(data["y_train"]), p["victim_fraction"], p["seed"], p["shuffle"])
    save_artifact(split, snakemake.output.split)
    write_json({"victim": len(split["victim"]), "pool": len(split["pool"]),
                "test": len(data["y_test"]), **p}, snakemake.output.summary)
