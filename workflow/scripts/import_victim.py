"""Import a user's model as a victim (its config entry has `source`): keep a checksummed
copy as the victim's model.pt, write its test predictions and metrics like a trained
victim's, so every downstream rule works unchanged."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).resolve().parents[1] / "src"))

from mextract.runtime import quick_imports

with quick_imports():  # no garbage collection while the imports load
    import shutil
    import time

    import pandas as pd

    from mextract.byo import load_byo, num_classes_of
    from mextract.data import load_dataset
    from mextract.io import (checksum_path, load_artifact, save_artifact, sha256_file, write_json,
                             write_text)
    from mextract.metrics import predict
    from mextract.runtime import eprint, logged, setup
    from mextract.victim import victim_scores

with logged(snakemake.log[0], f"victims.{snakemake.wildcards.victim}"):
    t0 = time.perf_counter()
    v = snakemake.params.victim
    source = v["source"]
    compute = setup(snakemake.params.compute, snakemake.threads)
    data = load_dataset(snakemake.input.data)
    n = num_classes_of(source, len(data["classes"]))
    if n != len(data["classes"]):
        raise ValueError(f"victim '{snakemake.wildcards.victim}': the model has {n} classes, "
                         f"the data set {len(data['classes'])} ({data['name']})")
    out = Path(snakemake.output.model)
    if source["type"] == "state_dict":  # re-saved: tensors only, checksummed
        src = Path(snakemake.input.source)
        state = load_artifact(src, verify=checksum_path(src).exists())
        save_artifact(state, out)
    else:  # TorchScript (code: see docs/serve.md): copied as is, with a checksum
        shutil.copyfile(snakemake.input.source, out)
        checksum_path(out).write_text(f"{sha256_file(out)}  {out.name}\n")
    model = load_byo(out, v, n)
    eprint(f"imported {source['type']} model {snakemake.input.source} ({n} classes)")
    pred = predict(model, data["x_test"], compute)
    save_artifact({"pred": pred}, snakemake.output.test_pred)
    scores = victim_scores(model, data["x_test"], data["y_test"], compute, None)
    write_text(pd.DataFrame([{"epoch": 0, "test_accuracy": scores["test_accuracy"]}])
               .to_csv(index=False), snakemake.output.history)
    write_json({
        "victim": snakemake.wildcards.victim,
        **{k: val for k, val in v.items() if k not in ("train", "trivial_augment", "seed")},
        "arch": v["arch"] if source["type"] == "state_dict" else "torchscript",
        "width": v["width"] if source["type"] == "state_dict" else None,
        "imported": True, "train_images": 0, **scores,
        "wall_time_s": round(time.perf_counter() - t0, 2),
        "compute": compute.as_dict(),
    }, snakemake.output.metrics)
