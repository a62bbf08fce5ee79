"""The ``mextract`` command (also ``python -m mextract.cli``).

``mextract serve``: serve a victim of a workflow config behind one of its API entries
(mode and defence layers) over HTTP (:mod:`mextract.serve`, uvicorn). The victim is
the one the workflow trained (``<results>/victims/<victim>/model.pt``) or a user's
model (a victim entry with ``source``, :mod:`mextract.byo`). Keys come from a YAML
file, never from the config::

    # keys.yaml: client name -> key, or -> {key, budget}
    auditor: 9c1f...            # budget: --budget (or none)
    partner: {key: 77aa..., budget: 5000}

Example: ``mextract serve --config config/demo.yaml --api defended --keys keys.yaml
--port 8000 --budget 20000 --log-dir results/served``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml


def read_keys(path: str | Path) -> tuple[dict[str, str], dict[str, int | None]]:
    """(client -> key, client -> budget given in the file) from a keys YAML file."""
    with open(path) as f:
        entries = yaml.safe_load(f) or {}
    if not isinstance(entries, dict) or not entries:
        raise SystemExit(f"{path}: expected a mapping of client name -> key")
    keys: dict[str, str] = {}
    budgets: dict[str, int | None] = {}
    for client, entry in entries.items():
        if isinstance(entry, dict):
            if "key" not in entry:
                raise SystemExit(f"{path}: client '{client}' has no 'key'")
            keys[str(client)] = str(entry["key"])
            if "budget" in entry:
                budgets[str(client)] = None if entry["budget"] is None else int(entry["budget"])
        else:
            keys[str(client)] = str(entry)
    return keys, budgets


def build_server(args: argparse.Namespace) -> Any:
    """The FastAPI app for ``mextract serve`` (separate from running it, for tests)."""
    from mextract import config as mc
    from mextract.byo import is_byo
    from mextract.compute import Compute
    from mextract.experiment import load_victim, make_api
    from mextract.serve import create_app

    cfg = mc.load(args.config)
    if args.api is not None:
        if args.api not in cfg["apis"]:
            raise SystemExit(f"--api {args.api}: not an entry of 'apis' in {args.config} "
                             f"(defined: {', '.join(cfg['apis']) or 'none'})")
        api_cfg = dict(cfg["apis"][args.api])
        if "url" in api_cfg:
            raise SystemExit(f"--api {args.api} is itself a URL API; serve a local one")
    else:
        api_cfg = {"mode": args.mode, "defences": [], "victim": args.victim or "clean"}
    victim = args.victim or api_cfg["victim"]
    if victim not in cfg["victims"]:
        raise SystemExit(f"--victim {victim}: not an entry of 'victims' in {args.config}")
    victim_cfg = cfg["victims"][victim]
    results = Path(args.results)
    model_path = results / "victims" / victim / "model.pt"
    if is_byo(victim_cfg) and not model_path.exists():
        model_path = Path(victim_cfg["source"]["path"])
    if not model_path.exists():
        raise SystemExit(f"{model_path} does not exist: train the victim first "
                         f"(snakemake --configfile {args.config} {model_path})")
    classes: list[str] | None = None
    if is_byo(victim_cfg):
        classes = list(victim_cfg["source"]["classes"])
    elif args.num_classes is None:
        from mextract.data import load_dataset

        classes = list(load_dataset(results / "data" / "dataset.pt")["classes"])
    num_classes = args.num_classes or len(classes or [])
    model = load_victim(model_path, victim_cfg, num_classes)
    compute = Compute(device=args.device or cfg["compute"]["device"], amp=False)
    keys, file_budgets = read_keys(args.keys)
    budgets = {c: file_budgets.get(c, args.budget) for c in keys}
    serve_cfg = {**api_cfg, "budget": None}
    return create_app(lambda: make_api(model, serve_cfg, compute), keys, budget=budgets,
                      max_batch=args.max_batch, rate_limit=args.rate_limit,
                      log_dir=args.log_dir, num_classes=num_classes, classes=classes,
                      image_shape=(3, args.image_size, args.image_size),
                      name=f"{victim}/{args.api or args.mode}")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mextract", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="serve a victim API over HTTP (docs/serve.md)")
    s.add_argument("--config", default="config/config.yaml", help="workflow config file")
    s.add_argument("--api", help="entry of 'apis' to serve (mode and defence layers)")
    s.add_argument("--mode", default="soft", choices=["soft", "hard", "honey"],
                   help="without --api: the answer mode (no defences)")
    s.add_argument("--victim", help="entry of 'victims' (default: the API's victim)")
    s.add_argument("--keys", required=True, help="YAML file: client -> key or {key, budget}")
    s.add_argument("--budget", type=int, default=None,
                   help="queries per client (a client's budget in --keys wins)")
    s.add_argument("--max-batch", type=int, default=1024, help="images per request at most")
    s.add_argument("--rate-limit", type=float, default=None,
                   help="images per second per client (default: no limit)")
    s.add_argument("--log-dir", default=None,
                   help="write every client's queries (and DAWN log) under this folder")
    s.add_argument("--results", default="results", help="the workflow's results folder")
    s.add_argument("--num-classes", type=int, default=None,
                   help="classes of a trained victim (default: from the cached data set)")
    s.add_argument("--image-size", type=int, default=32,
                   help="side of the square uint8 images the API takes (the pipeline's: 32)")
    s.add_argument("--device", default=None, help="compute device (default: the config's)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command == "serve":
        import uvicorn

        app = build_server(args)
        info = app.state.info
        print(f"serving {info['name']} ({info['description']}, {info['num_classes']} "
              f"classes) on http://{args.host}:{args.port}", file=sys.stderr)
        uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0


if __name__ == "__main__":
    sys.exit(main())
