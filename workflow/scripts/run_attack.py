"""Run one extraction experiment; write the substitute, its metrics and history."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).resolve().parents[1] / "src"))

import pandas as pd

from mextract.data import load_dataset
from mextract.experiment import load_victim, run_experiment
from mextract.io import load_artifact, save_artifact, write_json
from mextract.runtime import logged, setup

with logged(snakemake.log[0]):
    s = snakemake.params.settings
    compute = setup(s["compute"], snakemake.threads, s["seed"])
    data = load_dataset(snakemake.input.data)
    inp = dict(snakemake.input.items())
    victim = None
    if "victim" in inp:
        victim = load_victim(inp["victim"], snakemake.params.victim, len(data["classes"]))
    result, metrics = run_experiment(
        strategy=s["strategy"], params=s["params"], data=data,
        split=load_artifact(snakemake.input.split),
        victim_test_pred=load_artifact(snakemake.input.victim_pred)["pred"],
        substitute=s["substitute"], train_cfg=s["train"], compute=compute, seed=s["seed"],
        workdir=snakemake.params.workdir,
        cache=load_artifact(inp["cache"]) if "cache" in inp else None,
        victim=victim, api_cfg=s["api"],
    )
    metrics.update({"experiment": s["name"], "stage": s["stage"], "api_name": s["api_name"],
                    "victim": s["victim"], "substitute": s["substitute"]})
    workdir = Path(snakemake.params.workdir)
    if result.query_log is not None:
        save_artifact(result.query_log, workdir / "query_log.pt")
    save_artifact(result.model.cpu().state_dict(), snakemake.output.model)
    pd.DataFrame(result.history).to_csv(snakemake.output.history, index=False)
    write_json(metrics, snakemake.output.metrics)
    for ckpt in workdir.glob("checkpoint-*.pt*"):
        ckpt.unlink()
