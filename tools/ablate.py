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
(the job's metrics plus the changed parameters) and ``ablation.csv`` (one row per
variant and seed: fidelity, test accuracy, queries).
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


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
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
    rows = []
    for name, *items in args.variant:
        changed = overrides(items)
        for seed in args.seeds:
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
                            "changed": changed, "wall_s": round(time.perf_counter() - t0, 1)})
            (out / f"{name}-seed{seed}.json").write_text(json.dumps(metrics, indent=1,
                                                                    default=str))
            rows.append({"variant": name, "seed": seed, "changed": json.dumps(changed),
                         "fidelity": metrics.get("fidelity"),
                         "test_accuracy": metrics.get("test_accuracy"),
                         "queries": metrics.get("queries"), "wall_s": metrics["wall_s"]})
            print(json.dumps(rows[-1]), flush=True)
            pd.DataFrame(rows).to_csv(out / "ablation.csv", index=False)


if __name__ == "__main__":
    main()
