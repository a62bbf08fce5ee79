"""Train a model a defence layer needs (MAD's surrogate, adaptive misinformation's
misinformation model) on the defender's own data: the victim's training half."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).resolve().parents[1] / "src"))

from mextract.runtime import quick_imports

with quick_imports():  # no garbage collection while the imports load
    from mextract.data import load_dataset
    from mextract.defence_models import save_defence_model, train_defence_model
    from mextract.experiment import load_victim
    from mextract.io import load_artifact
    from mextract.runtime import logged, setup

with logged(snakemake.log[0]):
    compute = setup(snakemake.params.compute, snakemake.threads, snakemake.params.seed)
    data = load_dataset(snakemake.input.data)
    idx = load_artifact(snakemake.input.split)["victim"]
    victim = load_victim(snakemake.input.victim, snakemake.params.victim, len(data["classes"]))
    spec = dict(snakemake.params.spec)
    kind = spec.pop("kind")
    model = train_defence_model(kind, spec, data["x_train"][idx], data["y_train"][idx],
                                victim, compute, seed=snakemake.params.seed)
    save_defence_model(model, snakemake.output.model, kind, spec, len(data["classes"]))
