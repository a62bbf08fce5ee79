"""Stage 0: train the victim; write weights, test predictions, metrics (clean accuracy and
the trigger watermark's WSR), history."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).resolve().parents[1] / "src"))

from mextract.runtime import quick_imports

with quick_imports():  # no garbage collection while the imports load
    import time

    from mextract.data import load_dataset
    from mextract.io import load_artifact, rows_csv, save_artifact, write_json, write_text
    from mextract.metrics import predict
    from mextract.runtime import discard_stale_checkpoints, logged, setup
    from mextract.train import TrainConfig
    from mextract.victim import train_victim, victim_scores

with logged(snakemake.log[0]):
    t0 = time.perf_counter()
    v = snakemake.params.victim
    compute = setup(snakemake.params.compute, snakemake.threads, snakemake.params.seed)
    # a checkpoint left by a killed run with other settings or code must not be resumed
    ckpt = Path(snakemake.params.checkpoint)
    discard_stale_checkpoints(ckpt.with_suffix(".key"), dict(snakemake.params.items()),
                              pattern=ckpt.stem + "*.pt*")
    data = load_dataset(snakemake.input.data)
    idx = load_artifact(snakemake.input.split)["victim"]
    cfg = TrainConfig.from_dict(v["train"])
    model, history = train_victim(
        data["x_train"][idx], data["y_train"][idx], data["x_test"], data["y_test"],
        arch=v["arch"], width=v["width"], num_classes=len(data["classes"]), cfg=cfg,
        compute=compute, seed=snakemake.params.seed, trivial_augment=v["trivial_augment"],
        checkpoint=snakemake.params.checkpoint, watermark=v.get("watermark"),
    )
    pred = predict(model, data["x_test"], compute)
    save_artifact(model.cpu().state_dict(), snakemake.output.model)
    save_artifact({"pred": pred}, snakemake.output.test_pred)
    write_text(rows_csv(history), snakemake.output.history)
    write_json({
        "victim": snakemake.wildcards.victim, **v,
        "train_images": len(idx),
        **victim_scores(model, data["x_test"], data["y_test"], compute, v.get("watermark")),
        "train_time_s": history[-1]["train_time_s"],
        "wall_time_s": round(time.perf_counter() - t0, 2),
        "compute": compute.as_dict(),
    }, snakemake.output.metrics)
    for f in (snakemake.params.checkpoint, snakemake.params.checkpoint + ".sha256"):
        Path(f).unlink(missing_ok=True)
