"""Convert the configured data set once into a cached uint8 tensor file."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).resolve().parents[1] / "src"))

from mextract.runtime import quick_imports

with quick_imports():  # no garbage collection while the imports load
    from mextract.data import build_dataset, save_dataset
    from mextract.runtime import eprint, logged

with logged(snakemake.log[0]):
    ds = snakemake.params.dataset
    data = build_dataset(ds["name"], ds["root"], seed=ds["seed"], download=ds["download"],
                         test_fraction=ds["test_fraction"])
    eprint(f"{data['name']}: {len(data['x_train'])} train, {len(data['x_test'])} test images, "
           f"{len(data['classes'])} classes")
    save_dataset(data, snakemake.output.data)
