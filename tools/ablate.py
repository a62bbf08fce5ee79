"""Parameter ablation of one experiment against a finished workflow run's inputs.

Runs an experiment of a config with some of its strategy parameters changed, for each
given seed, through the same library calls as the workflow's ``run_attack`` job
(same data, split, victim and API, same substitute recipe), reading the finished run's
files read-only, and writes each variant's metrics under ``--out``. For "what was
tried" questions (does MARICH beat random at the same budget with another setting?)
without adding experiments to a committed config; the workflow's own table stays the
place for the results a config defines.

    PYTHONPATH=src python tools/ablate.py --config config/cifar10-cpu.yaml \\
      --set 'dataset={name: imagefolder, root: ../shared/data/cifar10-jpeg}' \\
      --run /path/to/finished/run --exp marich --seeds 0 1 \\
      --out /tmp/ablate --variant init2000 initial=2000

Each ``--variant NAME key=value ...`` is one setting (values parsed as YAML); several
``--variant`` groups run one after another. ``--out`` gets ``<variant>-seed<s>.json``
(the job's metrics plus the changed parameters), ``ablation.csv`` (one row per
variant and seed: fidelity, test accuracy, queries) and ``ablation.md``: fidelity mean
± sd over the seeds per variant and, with ``--compare EXP`` (say the experiment's
equal-budget random baseline, ``marich-random``), that finished experiment's jobs of
the same seeds beside them and each variant's gain over it (per seed, then mean ± sd).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="the run's config file")
    p.add_argument("--set", action="append", default=[],
                   help="top-level config override KEY=YAML, as the run's --config had")
    p.add_argument("--run", required=True, help="the finished run's directory (holds results/)")
    p.add_argument("--exp", required=True, help="experiment of the config to vary")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--threads", type=int, default=int(os.environ.get("THREADS", "1")))
    p.add_argument("--out", required=True, help="folder for the variants' metrics")
    p.add_argument("--compare", default=None,
                   help="a finished experiment of the run to set beside the variants")
    p.add_argument("--variant", nargs="+", action="append", required=True,
                   metavar=("NAME", "KEY=VALUE"),
                   help="a variant: its name, then parameter overrides")
    return p.parse_args(argv)


def overrides(items: list[str]) -> dict[str, object]:
    out: dict[str, object] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"expected KEY=VALUE, got {item!r}")
        out[key] = yaml.safe_load(value)
    return out


def inputs_digest(paths: list[Path]) -> str:
    """sha256 of the run's input files (data, split, victim, caches): a variant's saved
    metrics are reused only while these are unchanged."""
    import hashlib

    h = hashlib.sha256()
    for path in sorted(paths):
        h.update(str(path.name).encode())
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]


def row(metrics: dict[str, object]) -> dict[str, object]:
    return {"variant": metrics["variant"], "seed": metrics["seed"],
            "changed": json.dumps(metrics["changed"]), "fidelity": metrics.get("fidelity"),
            "test_accuracy": metrics.get("test_accuracy"),
            "queries": metrics.get("queries"), "wall_s": metrics.get("wall_s")}


def _pm(values: list[float]) -> str:
    import statistics

    mean = statistics.fmean(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * mean:.2f} ± {100 * sd:.2f}"


def markdown(rows: list[dict[str, object]], compare: dict[int, float] | None,
             compare_name: str | None) -> str:
    """Fidelity per variant (mean ± sd over seeds, n) and the gain over ``compare``
    (fidelity per seed of a finished experiment), paired by seed."""
    variants = list(dict.fromkeys(str(r["variant"]) for r in rows))
    head = "| variant | changed | n | fidelity (%) |"
    rule = "|---|---|---|---|"
    if compare:
        head += f" gain over {compare_name} (pp) |"
        rule += "---|"
    lines = [head, rule]
    if compare:
        lines.append(f"| {compare_name} (the run's) | | {len(compare)} | "
                     f"{_pm(list(compare.values()))} |  |")
    for v in variants:
        mine = [r for r in rows if r["variant"] == v]
        line = (f"| {v} | {mine[0]['changed']} | {len(mine)} | "
                f"{_pm([float(r['fidelity']) for r in mine])} |")
        if compare:
            gains = [float(r["fidelity"]) - compare[int(r["seed"])] for r in mine
                     if int(r["seed"]) in compare]
            line += f" {_pm(gains) if gains else ''} |"
        lines.append(line)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    # as Snakemake does for a job: the native libraries' thread pools (OpenMP in
    # scikit-learn's k-means, BLAS) get the job's thread count, so a variant computes
    # exactly what the workflow's job of the same settings computes
    for var in ("OMP_NUM_THREADS", "GOTO_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS"):
        os.environ[var] = str(args.threads)
    import pandas as pd

    from mextract import config as mc
    from mextract.data import load_dataset
    from mextract.experiment import load_defence_models, load_victim, run_experiment
    from mextract.io import load_artifact
    from mextract.runtime import setup

    cfg = mc.load(args.config, overrides(args.set))
    if args.exp not in cfg["experiments"]:
        raise SystemExit(f"experiment {args.exp!r} is not in {args.config}")
    run = Path(args.run)
    inputs = {k: ([run / f for f in v] if isinstance(v, list) else run / v)
              for k, v in mc.attack_inputs(cfg, args.exp).items()}
    for path in [p for v in inputs.values() for p in (v if isinstance(v, list) else [v])]:
        if not path.exists():
            raise SystemExit(f"{path} is missing: is {run} a finished run of {args.config}?")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = load_dataset(inputs["data"])
    split = load_artifact(inputs["split"])
    victims = mc.attack_victims(cfg, args.exp)
    compare = None
    if args.compare:
        compare = {}
        for seed in args.seeds:
            path = run / mc.experiment_dir(args.compare, seed) / "metrics.json"
            if not path.exists():
                raise SystemExit(f"{path} is missing: --compare names a finished experiment")
            compare[seed] = float(json.loads(path.read_text())["fidelity"])
    digest = inputs_digest([p for v in inputs.values()
                            for p in (v if isinstance(v, list) else [v])])
    rows = []
    for name, *items in args.variant:
        changed = overrides(items)
        for seed in args.seeds:
            done = out / f"{name}-seed{seed}.json"
            if done.exists():  # a finished variant of the same inputs is kept, not rerun
                old = json.loads(done.read_text())
                if old.get("changed") == changed and old.get("inputs_digest") == digest:
                    rows.append(row(old))
                    continue
            s = mc.attack_settings(cfg, args.exp, seed)
            params = {**s["params"], **changed}
            compute = setup(s["compute"], args.threads, seed)
            victim = (load_victim(inputs["victim"], victims["api"], len(data["classes"]))
                      if "victim" in inputs else None)
            files = inputs.get("defence_models", [])
            defence_models = load_defence_models(files if isinstance(files, list) else [files],
                                                 (s["api"] or {}).get("defences", []),
                                                 len(data["classes"]))
            t0 = time.perf_counter()
            _, metrics = run_experiment(
                strategy=s["strategy"], params=params, data=data, split=split,
                victim_test_pred=load_artifact(inputs["victim_pred"])["pred"],
                substitute=s["substitute"], train_cfg=s["train"], compute=compute,
                seed=seed, workdir=out / f"{name}-seed{seed}-work",
                cache=load_artifact(inputs["cache"]) if "cache" in inputs else None,
                victim=victim, api_cfg=s["api"], defence_models=defence_models,
                pool=s.get("pool"))
            metrics.update({"experiment": args.exp, "variant": name, "seed": seed,
                            "changed": changed, "inputs_digest": digest,
                            "wall_s": round(time.perf_counter() - t0, 1)})
            done.write_text(json.dumps(metrics, indent=1, default=str))
            rows.append(row(metrics))
            print(json.dumps(rows[-1]), flush=True)
            pd.DataFrame(rows).to_csv(out / "ablation.csv", index=False)
    (out / "ablation.md").write_text(markdown(rows, compare, args.compare))
    print(markdown(rows, compare, args.compare))


if __name__ == "__main__":
    main()
