"""Run one extraction experiment; write the substitute, its metrics and history."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).resolve().parents[1] / "src"))

from mextract.runtime import quick_imports

with quick_imports():  # no garbage collection while the imports load
    from mextract.data import load_dataset
    from mextract.experiment import load_defence_models, load_victim, run_experiment
    from mextract.io import load_artifact, rows_csv, save_artifact, write_json, write_text
    from mextract.runtime import discard_stale_checkpoints, logged, setup

with logged(snakemake.log[0], f"experiments.{snakemake.wildcards.exp}"):
    s = snakemake.params.settings
    compute = setup(s["compute"], snakemake.threads, s["seed"])
    workdir = Path(snakemake.params.workdir)
    # a checkpoint left by a killed run with other settings or code must not be resumed
    discard_stale_checkpoints(workdir / "checkpoint.key", dict(snakemake.params.items()),
                              pattern="checkpoint-*.pt*")
    data = load_dataset(snakemake.input.data)
    inp = dict(snakemake.input.items())
    victims = snakemake.params.victims
    victim = verify_victim = None
    if "victim" in inp:
        victim = load_victim(inp["victim"], victims["api"], len(data["classes"]))
    if "verify_victim" in inp:
        verify_victim = load_victim(inp["verify_victim"], victims["verify"],
                                    len(data["classes"]))
    model_files = inp.get("defence_models", [])
    defence_models = load_defence_models(
        [model_files] if isinstance(model_files, str) else model_files,
        (s["api"] or {}).get("defences", []), len(data["classes"]))
    log_files = inp.get("watermark_logs", [])
    logs = [load_artifact(f) for f in ([log_files] if isinstance(log_files, str) else log_files)]
    result, metrics = run_experiment(
        strategy=s["strategy"], params=s["params"], data=data,
        split=load_artifact(snakemake.input.split),
        victim_test_pred=load_artifact(snakemake.input.victim_pred)["pred"],
        substitute=s["substitute"], train_cfg=s["train"], compute=compute, seed=s["seed"],
        workdir=snakemake.params.workdir,
        cache=load_artifact(inp["cache"]) if "cache" in inp else None,
        victim=victim, api_cfg=s["api"], verify=s["verify"], watermark_logs=logs,
        verify_victim=verify_victim, defence_models=defence_models,
        detect=s.get("detect"), pool=s.get("pool"),
    )
    metrics.update({"experiment": s["name"], "seed": s["seed"], "stage": s["stage"],
                    "api_name": s["api_name"], "victim": s["victim"],
                    "substitute": s["substitute"], "baseline": s["baseline"],
                    "baseline_of": s["baseline_of"], "matrix": s.get("matrix")})
    if s["verify"] is not None:
        metrics["verify_api"] = s["verify"]["api_name"]
    if result.query_log is not None:
        save_artifact(result.query_log, workdir / "query_log.pt")
    save_artifact(result.model.cpu().state_dict(), snakemake.output.model)
    write_text(rows_csv(result.history), snakemake.output.history)
    write_json(metrics, snakemake.output.metrics)
    for ckpt in workdir.glob("checkpoint-*.pt*"):
        ckpt.unlink()
