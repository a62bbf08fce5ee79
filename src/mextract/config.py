"""The workflow configuration as plain data: load, validate, complete, expand into jobs.

Every function here is a plain function of a config dict (no Snakemake), so the
config logic is tested in milliseconds (tests/test_config.py) and ``rules/common.smk``
only wires these functions into rules.

* :func:`prepare` = :func:`validate` (JSON Schema of ``config/schema.yaml``, the only
  home of defaults, plus each strategy's parameter schema derived from its registry
  entry) + :func:`add_random_baselines` + :func:`cross_check` + :func:`canonical`.
  It raises :class:`ConfigError` listing every bad key by its dotted path before any
  job starts.
* The rest turns the prepared config into per-job settings: which victim, API, query
  cache, seeds, inputs and parameters each job has (:func:`attack_settings`,
  :func:`attack_inputs`, ...). Paths are relative to the workflow's working directory.

Why not ``snakemake.utils.validate`` alone: it fills defaults only for the top-level
``properties`` of a schema (not through ``$ref`` and ``additionalProperties``, which
every victim, API and experiment entry uses), it cannot express the cross-references
(an experiment's API must exist and answer what its strategy needs), and it would
tie the validation to a Snakemake run. The library validates with the same
``jsonschema`` package, filling defaults everywhere, and names every bad key.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from mextract import defaults
from mextract.attacks import registry
from mextract.defence_specs import LABEL_TYPES, required_models

#: config/schema.yaml of this checkout (the only home of defaults)
SCHEMA = defaults.SCHEMA
RESULTS = "results"
#: name suffix of the equal-budget random baseline added for an adaptive experiment
BASELINE_SUFFIX = "-random"
#: name prefix of the defence matrix's generated experiments (``mx.<defence>.<attack>``)
#: and APIs (``mx-<defence>-<soft|hard>``)
MATRIX_PREFIX = "mx"


class ConfigError(ValueError):
    """The configuration is invalid; the message names every bad key."""


# ------------------------------------------------------------------------ validation
def load_schema(path: str | Path | None = None) -> dict[str, Any]:
    with open(path or SCHEMA) as f:
        schema = yaml.safe_load(f)
    _lift_ref_defaults(schema, schema.get("$defs", {}))
    return schema


def _with_defaults(cls: Any) -> Any:
    """A jsonschema validator class that fills in each property's ``default``."""
    validate_properties = cls.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):  # type: ignore[no-untyped-def]
        if isinstance(instance, dict):
            for key, sub in properties.items():
                if "default" in sub and key not in instance:
                    instance[key] = copy.deepcopy(sub["default"])
        yield from validate_properties(validator, properties, instance, schema)

    return jsonschema.validators.extend(cls, {"properties": set_defaults})


_Validator = _with_defaults(jsonschema.Draft202012Validator)


def _lift_ref_defaults(node: Any, defs: Mapping[str, Any]) -> None:
    """Copy a referenced definition's ``default`` to each ``$ref`` site, so the
    default-filling validator sees it."""
    if isinstance(node, dict):
        ref = node.get("$ref", "")
        if ref.startswith("#/$defs/") and "default" not in node:
            target = defs[ref.rsplit("/", 1)[1]]
            if "default" in target:
                node["default"] = target["default"]
        for value in node.values():
            _lift_ref_defaults(value, defs)
    elif isinstance(node, list):
        for value in node:
            _lift_ref_defaults(value, defs)


def _path(parts: Iterable[Any]) -> str:
    return ".".join(str(p) for p in parts) or "<top level>"


def _schema_errors(instance: Any, schema: Mapping[str, Any], prefix: str = "") -> list[str]:
    errors = sorted(_Validator(schema).iter_errors(instance),
                    key=lambda e: list(map(str, e.absolute_path)))
    out = []
    for e in errors:
        where = _path(e.absolute_path)
        if prefix:
            where = prefix if where == "<top level>" else f"{prefix}.{where}"
        out.append(f"config key '{where}': {e.message}")
    return out


def param_schema(strategy: str) -> dict[str, Any]:
    """JSON Schema of a strategy's ``params``, from its registry entry: only its keys,
    each of the type of its default, numbers within the entry's limits (>= 0 where
    no limit is given)."""
    s = registry.get(strategy)
    props: dict[str, Any] = {}
    for key, default in s.defaults.items():
        if isinstance(default, bool):
            props[key] = {"type": "boolean"}
        elif isinstance(default, (int, float)):
            prop: dict[str, Any] = {"type": "integer" if isinstance(default, int) else "number"}
            low, high = s.limits.get(key, (0, None))
            if low is not None:
                prop["minimum"] = low
            if high is not None:
                prop["maximum"] = high
            props[key] = prop
        else:
            props[key] = {"type": "string"}
    return {"type": "object", "properties": props, "additionalProperties": False}


def validate(cfg: Mapping[str, Any], schema: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A copy of ``cfg`` checked against the schema, with every default filled in, each
    experiment's ``params`` checked against its strategy's :func:`param_schema`.
    Raises :class:`ConfigError` naming every bad key."""
    cfg = copy.deepcopy(dict(cfg))
    problems = _schema_errors(cfg, schema or load_schema())
    if not problems:
        for name, exp in cfg["experiments"].items():
            where = f"experiments.{name}"
            if exp["strategy"] not in registry.STRATEGIES:
                problems.append(
                    f"config key '{where}.strategy': unknown strategy '{exp['strategy']}' "
                    f"(known: {', '.join(sorted(registry.STRATEGIES))})")
                continue
            problems += _schema_errors(exp["params"], param_schema(exp["strategy"]),
                                       f"{where}.params")
    if problems:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(problems))
    return cfg


def first_victim(cfg: Mapping[str, Any]) -> str:
    return next(iter(cfg["victims"]))


#: known class counts of the built-in data sets (an imagefolder tree: its class folders)
DATASET_CLASSES = {"digits": 10, "cifar10": 10}


def dataset_classes(dataset: Mapping[str, Any]) -> int | None:
    """How many classes the configured data set has, from its name or, for an
    imagefolder tree, its ``train/`` class folders (None where that cannot be read)."""
    if dataset["name"] in DATASET_CLASSES:
        return DATASET_CLASSES[dataset["name"]]
    root = dataset.get("root")
    if root is None or not (Path(root) / "train").is_dir():
        return None
    return len(_class_folders(Path(root) / "train"))


def _class_folders(folder: Path) -> set[str]:
    """The class folders of an image tree's ``train/`` or ``test/`` part."""
    return {p.name for p in folder.iterdir() if p.is_dir()}


def image_folder_problems(dataset: Mapping[str, Any]) -> list[str]:
    """An imagefolder data set's tree, checked from its folder names before any job:
    ``root`` exists and has ``train/`` and ``test/`` with the same class folders."""
    if dataset["name"] != "imagefolder":
        return []
    root = dataset["root"]
    if root is None:
        return ["config key 'dataset.root': an imagefolder data set needs its image tree"]
    root = Path(root)
    if not root.is_dir():
        return [f"config key 'dataset.root': '{root}' is not a folder"]
    classes = {}
    for part in ("train", "test"):
        if not (root / part).is_dir():
            return [f"config key 'dataset.root': '{root}' has no '{part}/' folder (an "
                    "imagefolder data set needs train/<class>/* and test/<class>/*)"]
        classes[part] = _class_folders(root / part)
    if classes["train"] != classes["test"]:
        return [f"config key 'dataset.root': the class folders of '{root}/train' and "
                f"'{root}/test' differ: only in train: "
                f"{sorted(classes['train'] - classes['test'])}, only in test: "
                f"{sorted(classes['test'] - classes['train'])}"]
    if len(classes["train"]) < 2:
        return [f"config key 'dataset.root': '{root}/train' has fewer than 2 class folders"]
    return []


def cross_check(cfg: Mapping[str, Any]) -> list[str]:
    """The references the schema cannot express, as messages naming each bad key."""
    problems = image_folder_problems(cfg["dataset"])
    ds = cfg["dataset"]
    if ds["name"] == "cifar10" and not ds["download"]:
        copy_root = Path(ds["root"] or "resources/cifar10")
        if not (copy_root / "cifar-10-batches-py").is_dir():
            problems.append(
                f"config key 'dataset.root': '{copy_root}' holds no CIFAR-10 copy "
                "(cifar-10-batches-py/) and dataset.download is false")
    if ds["name"] == "digits" and ds.get("root") is not None:
        problems.append("config key 'dataset.root': the digits data set is bundled with "
                        "scikit-learn and reads no folder; remove root (or set "
                        "dataset.name to imagefolder or cifar10)")
    if cfg["dataset"]["name"] == "imagefolder" and not cfg["split"]["shuffle"]:
        problems.append(
            "config key 'split.shuffle': an imagefolder data set is read sorted by class, "
            "so an unshuffled split would give the victim and the pool different classes; "
            "set split.shuffle: true")
    for section in ("victims", "apis", "experiments"):
        # names become folders: two that differ only in case are one folder on a
        # case-insensitive file system (macOS, Windows), and would overwrite each other
        seen: dict[str, str] = {}
        for name in cfg[section]:
            if name.lower() in seen:
                problems.append(
                    f"config key '{section}.{name}': differs from '{section}."
                    f"{seen[name.lower()]}' only in case (one folder on a case-insensitive "
                    "file system)")
            seen.setdefault(name.lower(), name)
    classes = dataset_classes(ds)
    for name, victim in cfg["victims"].items():
        target = (victim.get("watermark") or {}).get("target")
        if target is not None and classes is not None and target >= classes:
            problems.append(
                f"config key 'victims.{name}.watermark.target': class {target} does not "
                f"exist (the data set has {classes} classes, 0-{classes - 1})")
    for name, api in cfg["apis"].items():
        if "url" in api:  # a served API: no victim here, the server holds the defences
            if not api.get("key_env"):
                problems.append(f"config key 'apis.{name}.key_env': a URL API needs the "
                                "name of the environment variable holding its key")
            if api["defences"]:
                problems.append(f"config key 'apis.{name}.defences': a URL API's defences "
                                "are the server's (mextract serve --api); remove them here")
            continue
        if "key_env" in api:
            problems.append(f"config key 'apis.{name}.key_env': only for an API with 'url'")
        if api["victim"] not in cfg["victims"]:
            problems.append(
                f"config key 'apis.{name}.victim': unknown victim '{api['victim']}' "
                f"(defined: {', '.join(cfg['victims'])})")
        types = [d["type"] for d in api["defences"]]
        # label layers need hard answers and come after every probability layer
        label_types = LABEL_TYPES
        label_layers = [t for t in types if t in label_types]
        if label_layers and api["mode"] == "soft":
            problems.append(
                f"config key 'apis.{name}.defences': the label layers "
                f"({', '.join(label_layers)}) act on hard labels; set "
                f"'apis.{name}.mode' to hard or honey")
        first_label = next((i for i, t in enumerate(types) if t in label_types), len(types))
        late = [i for i, t in enumerate(types) if i > first_label and t not in label_types]
        if late:
            problems.append(
                f"config key 'apis.{name}.defences.{late[0]}': the {types[late[0]]} layer "
                "acts on probability vectors and must come before every label layer "
                f"({', '.join(label_types)})")
        if "dawn" in types[:-1]:
            problems.append(
                f"config key 'apis.{name}.defences.{types.index('dawn')}': the dawn layer "
                "must be the last layer (it logs the labels it serves)")
    for name, exp in cfg["experiments"].items():
        where = f"experiments.{name}"
        strategy = registry.get(exp["strategy"])
        params = {**strategy.defaults, **exp["params"]}
        for low in [k for k in params if k.endswith("_min")]:
            high = low.removesuffix("_min") + "_max"
            if high in params and params[low] > params[high]:
                problems.append(
                    f"config key '{where}.params.{low}': {params[low]} is above "
                    f"{high} = {params[high]} (a range the wrong way round)")
        if strategy.answers is None:
            if "api" in exp:
                problems.append(f"config key '{where}.api': '{exp['strategy']}' never queries")
        elif exp.get("api") not in cfg["apis"]:
            problems.append(
                f"config key '{where}.api': '{exp.get('api')}' is not an entry of 'apis' "
                f"(defined: {', '.join(cfg['apis']) or 'none'})")
        else:
            kind = "soft" if cfg["apis"][exp["api"]]["mode"] == "soft" else "hard"
            if strategy.answers not in (kind, "any"):
                problems.append(
                    f"config key '{where}.api': strategy '{exp['strategy']}' needs "
                    f"{strategy.answers} answers, API '{exp['api']}' gives {kind}")
        pool = exp.get("pool") or {"source": "split"}
        if pool["source"] == "imagefolder" and not Path(pool["root"]).is_dir():
            problems.append(f"config key '{where}.pool.root': '{pool['root']}' is not a "
                            "folder (an ImageFolder tree, root/<class>/*)")
        if pool["source"] != "split" and (not strategy.adaptive or strategy.cache):
            problems.append(
                f"config key '{where}.pool': strategy '{exp['strategy']}' trains from a "
                f"shared query cache of the split's pool (or on true labels), so its pool "
                f"must be {{source: split}}, not '{pool['source']}'; other pools are for "
                f"strategies that ask only the live API")
        if exp.get("victim", first_victim(cfg)) not in cfg["victims"]:
            problems.append(f"config key '{where}.victim': unknown victim '{exp['victim']}'")
        if "verify_api" in exp:
            if exp["stage"] != 3:
                problems.append(
                    f"config key '{where}.verify_api': only stage-3 experiments are "
                    f"verified (this one has stage {exp['stage']})")
            elif exp["verify_api"] not in cfg["apis"]:
                problems.append(
                    f"config key '{where}.verify_api': '{exp['verify_api']}' is not an "
                    f"entry of 'apis' (defined: {', '.join(cfg['apis']) or 'none'})")
        elif exp["stage"] == 3 and "api" not in exp:
            problems.append(
                f"config key '{where}.verify_api': a stage-3 experiment that never "
                "queries needs the API whose watermark it is checked against")
    return problems


def add_random_baselines(cfg: dict[str, Any]) -> None:
    """For every experiment of an adaptive selection strategy (its registry entry names
    a ``baseline``), add ``<name>-random``: the baseline strategy with the same API,
    victim, stage, substitute, training recipe and seeds, spending the same budget
    (the parameters listed in ``baseline_params``) on uniformly random inputs. The
    adaptive experiment gets ``baseline: <name>-random``, the new one ``baseline_of``.
    Placed right after its adaptive experiment (the table's order)."""
    if not cfg.get("random_baselines", True):
        return
    out: dict[str, Any] = {}
    for name, exp in cfg["experiments"].items():
        if name in out:  # a baseline placed already (a config prepared before)
            continue
        out[name] = exp
        strategy = registry.get(exp["strategy"])
        if strategy.baseline is None or "matrix" in exp:  # matrix cells: the attack's
            continue  # own experiment has the baseline against the undefended API
        twin = f"{name}{BASELINE_SUFFIX}"
        if cfg["experiments"].get(twin, {}).get("baseline_of") == name:
            out[twin] = cfg["experiments"][twin]  # prepared before: idempotent
            continue
        if twin in cfg["experiments"]:
            raise ConfigError(f"invalid configuration:\n  config key 'experiments.{twin}': "
                              f"this name is reserved for the random baseline of '{name}'")
        params = {**strategy.defaults, **exp["params"]}
        baseline = {k: copy.deepcopy(v) for k, v in exp.items()
                    if k not in ("strategy", "params")}
        baseline.update(strategy=strategy.baseline, baseline_of=name,
                        params={k: params[k] for k in strategy.baseline_params})
        exp["baseline"] = twin
        out[twin] = baseline
    cfg["experiments"] = out


# ------------------------------------------------------------------- defence matrix
def _answer_kind(api: Mapping[str, Any]) -> str:
    return "soft" if api["mode"] == "soft" else "hard"


def keeps_top1(layer: Mapping[str, Any]) -> bool:
    """Whether a probability layer's contract serves the victim's top-1 class
    unchanged (tests/test_soft_defences.py checks each), so that behind a hard-label
    API it changes no answer."""
    kind = layer["type"]
    if kind in ("topk", "rounding", "reverse_sigmoid"):
        return True
    if kind in ("noise", "mad"):
        return bool(layer.get("keep_argmax", False))
    return False


def hard_equivalent(layers: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The layers of a stack that can change a hard-label answer: label layers, and
    probability layers that may move the top-1 class. A hard-label API behind the
    other layers answers exactly what it answers without them."""
    return [dict(layer) for layer in layers
            if layer["type"] in LABEL_TYPES or not keeps_top1(layer)]


def _find_api(cfg: Mapping[str, Any], api: Mapping[str, Any]) -> str | None:
    for name, other in cfg["apis"].items():
        if canonical(dict(other)) == canonical(dict(api)):
            return name
    return None


def _matrix_plan(cfg: Mapping[str, Any], defence: str,
                 attack: str) -> tuple[str, dict[str, Any] | None, dict[str, Any] | None]:
    """One cell of the defence matrix: (experiment name, its experiment entry or None
    when the cell reuses an existing experiment, its API entry or None when that API
    exists). Soft-label attacks against stacks with label layers are not cells
    (:func:`matrix_applies`)."""
    m = cfg["matrix"]
    exp = cfg["experiments"][attack]
    base_api = cfg["apis"][exp["api"]]
    kind = _answer_kind(base_api)
    layers = [dict(layer) for layer in m["defences"][defence]]
    if kind == "hard":
        layers = hard_equivalent(layers)
    api = {**copy.deepcopy(dict(base_api)), "mode": kind, "defences": layers}
    api_name = _find_api(cfg, api)
    new_api = None
    if api_name is None:
        api_name = f"{MATRIX_PREFIX}-{defence}-{kind}"
        new_api = api
    train = {**exp.get("train", {}), **m.get("train", {})}
    if api_name == exp["api"] and train == exp.get("train", {}):
        return attack, None, new_api  # the attack's own experiment is this cell
    cell = {k: copy.deepcopy(v) for k, v in exp.items()
            if k not in ("baseline", "baseline_of", "train", "api")}
    cell.update(api=api_name, matrix={"attack": attack, "defence": defence})
    if train:
        cell["train"] = train
    if m.get("seeds"):
        cell["seeds"] = list(m["seeds"])
    return f"{MATRIX_PREFIX}.{defence}.{attack}", cell, new_api


def matrix_applies(cfg: Mapping[str, Any], defence: str, attack: str) -> bool:
    """Soft-label attacks run against stacks of probability layers only (a label layer
    has no soft answer to change); hard-label attacks against every stack."""
    kind = _answer_kind(cfg["apis"][cfg["experiments"][attack]["api"]])
    layers = cfg["matrix"]["defences"][defence]
    return kind == "hard" or not any(layer["type"] in LABEL_TYPES for layer in layers)


def add_matrix(cfg: dict[str, Any]) -> None:
    """Expand ``matrix`` (defence stacks x attacks) into experiments ``mx.<d>.<a>``
    (the attack's experiment entry against an API with the stack; tagged
    ``matrix: {defence, attack}``) and APIs ``mx-<d>-<soft|hard>``. A cell whose API
    answers exactly what the attack's own API answers (the same stack, or, for a
    hard-label attack, probability layers that keep the top-1 class) and whose recipe
    is the same reuses the attack's experiment; equal APIs share one name, so their
    query caches are collected once. Idempotent on a prepared config."""
    m = cfg.get("matrix")
    if not m:
        return
    problems = [f"config key 'matrix.attacks': '{a}' is not an entry of 'experiments'"
                for a in m["attacks"] if a not in cfg["experiments"]]
    problems += [f"config key 'matrix.attacks': '{a}' never queries (strategy "
                 f"'{cfg['experiments'][a]['strategy']}')" for a in m["attacks"]
                 if a in cfg["experiments"] and "api" not in cfg["experiments"][a]]
    problems += [f"config key 'matrix.attacks': '{a}' queries API "
                 f"'{cfg['experiments'][a]['api']}', which already has defence layers"
                 for a in m["attacks"] if cfg["experiments"].get(a, {}).get("api")
                 in cfg["apis"] and cfg["apis"][cfg["experiments"][a]["api"]]["defences"]]
    problems += [f"config key 'matrix.detection.attacks': '{a}' is not an entry of "
                 "'experiments' that queries an API" for a in m["detection"]["attacks"]
                 if "api" not in cfg["experiments"].get(a, {})]
    problems += [f"config key 'matrix.attacks': '{a}' queries the served API "
                 f"'{cfg['experiments'][a]['api']}' (its defences are the server's)"
                 for a in m["attacks"] if "url" in cfg["apis"].get(
                     cfg["experiments"].get(a, {}).get("api"), {})]
    for name in cfg["experiments"]:
        if name.startswith(f"{MATRIX_PREFIX}.") and "matrix" not in cfg["experiments"][name]:
            problems.append(f"config key 'experiments.{name}': names starting with "
                            f"'{MATRIX_PREFIX}.' are reserved for the defence matrix")
    if problems:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(problems))
    for defence in m["defences"]:
        for attack in m["attacks"]:
            if not matrix_applies(cfg, defence, attack):
                continue
            name, cell, new_api = _matrix_plan(cfg, defence, attack)
            if new_api is not None:
                cfg["apis"][f"{MATRIX_PREFIX}-{defence}-{_answer_kind(new_api)}"] = new_api
            if cell is not None:
                cfg["experiments"][name] = cell


def matrix_cells(cfg: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every (defence, attack) cell of the prepared config's matrix: its experiment,
    API, answer kind and whether it reuses another experiment's result."""
    m = cfg.get("matrix")
    if not m:
        return []
    cells = []
    for defence in m["defences"]:
        for attack in m["attacks"]:
            if not matrix_applies(cfg, defence, attack):
                continue
            name, _, _ = _matrix_plan(cfg, defence, attack)
            exp = cfg["experiments"][name]
            cells.append({"defence": defence, "attack": attack, "experiment": name,
                          "api": exp["api"], "answers": _answer_kind(cfg["apis"][exp["api"]]),
                          "strategy": exp["strategy"], "stage": exp["stage"],
                          "shared": name == attack})
    return cells


def matrix_apis(cfg: Mapping[str, Any]) -> list[str]:
    """The APIs of the matrix's cells (each gets its honest-user cost measured)."""
    return sorted({c["api"] for c in matrix_cells(cfg)})


def matrix_controls(cfg: Mapping[str, Any]) -> list[str]:
    """The no-theft controls of the stages the matrix's attacks are in."""
    stages_ = {cfg["experiments"][a]["stage"] for a in (cfg.get("matrix") or {}).get(
        "attacks", [])}
    return [name for name, e in cfg["experiments"].items()
            if e["strategy"] == "control" and e["stage"] in stages_ and "matrix" not in e]


def matrix_victims(cfg: Mapping[str, Any]) -> list[str]:
    return sorted({cfg["apis"][a]["victim"] for a in matrix_apis(cfg)})


def matrix_metric_files(cfg: Mapping[str, Any]) -> list[str]:
    """The metrics of every cell's jobs and of the stage controls."""
    exps = list(dict.fromkeys([c["experiment"] for c in matrix_cells(cfg)]
                              + matrix_controls(cfg)))
    return experiment_files(cfg, "metrics.json", exps)


def defence_model_specs(cfg: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Every defence model any API needs, by its key
    (:func:`mextract.defence_specs.required_models`)."""
    out: dict[str, dict[str, Any]] = {}
    for api in cfg["apis"].values():
        out.update(required_models([dict(d) for d in api["defences"]]))
    return out


def defence_model_files(cfg: Mapping[str, Any], api: str) -> list[str]:
    """The trained models an API's layers need (rule train_defence_model)."""
    entry = cfg["apis"][api]
    return [f"{RESULTS}/defence_models/{entry['victim']}/{key}.pt"
            for key in required_models([dict(d) for d in entry["defences"]])]


def cost_inputs(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Inputs of rule defence_costs: data, every matrix victim and defence model, and
    the victims' test predictions (the classes PRADA's honest clients are grouped by)."""
    victims = matrix_victims(cfg)
    return {
        "data": f"{RESULTS}/data/dataset.pt",
        "victims": [f"{RESULTS}/victims/{v}/model.pt" for v in victims],
        "predictions": [f"{RESULTS}/victims/{v}/test_predictions.pt" for v in victims],
        "defence_models": sorted({f for a in matrix_apis(cfg)
                                  for f in defence_model_files(cfg, a)}),
    }


def detect_settings(cfg: Mapping[str, Any], exp: str) -> dict[str, Any] | None:
    """PRADA's settings for an attack the matrix lists or ``matrix.detection.attacks``
    names (its query stream is examined in its own job); None for every other one."""
    if exp not in detected_attacks(cfg):
        return None
    return {k: v for k, v in cfg["matrix"]["detection"].items() if k != "attacks"}


def detected_attacks(cfg: Mapping[str, Any]) -> list[str]:
    """The experiments whose query streams PRADA examines: the matrix's attacks and
    ``matrix.detection.attacks``."""
    m = cfg.get("matrix")
    if not m:
        return []
    return list(dict.fromkeys([*m["attacks"], *m["detection"]["attacks"]]))


def table_experiments(cfg: Mapping[str, Any]) -> list[str]:
    """The experiments of the results table and stage plots (not the matrix's cells)."""
    return [name for name, e in cfg["experiments"].items() if "matrix" not in e]


def canonical(value: Any) -> Any:
    """Dicts with sorted keys, recursively: params compare equal however the config file
    orders its keys, so reordering a config never triggers a rerun."""
    if isinstance(value, dict):
        return {k: canonical(value[k]) for k in sorted(value)}
    if isinstance(value, list):
        return [canonical(v) for v in value]
    return value


def prepare(cfg: Mapping[str, Any], schema: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The validated, completed, expanded config the workflow runs (see module doc)."""
    out = validate(cfg, schema)
    add_random_baselines(out)
    # the matrix's cells copy experiments and APIs checked first; then the cells too
    for step in (lambda c: None, add_matrix):
        step(out)
        problems = cross_check(out)
        if problems:
            raise ConfigError("invalid configuration:\n  " + "\n  ".join(problems))
    # experiments and the matrix's defences keep their order (the tables' row order);
    # everything else is sorted
    experiments = {name: canonical(exp) for name, exp in out.pop("experiments").items()}
    matrix = out.pop("matrix", None)
    out = canonical(out)
    if matrix is not None:
        defences = {name: canonical(stack) for name, stack in matrix.pop("defences").items()}
        out["matrix"] = {**canonical(matrix), "defences": defences}
    out["experiments"] = experiments
    return out


class _StrictLoader(yaml.SafeLoader):
    """A YAML loader that refuses a key given twice in one mapping (PyYAML keeps the
    last silently, so a second ``kd:`` experiment would replace the first)."""


def _strict_mapping(loader: _StrictLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        line = key_node.start_mark.line + 1
        if key in seen:
            raise ConfigError(
                f"invalid configuration:\n  {key_node.start_mark.name}, line {line}: "
                f"config key '{key}' is given twice in one mapping (first on line "
                f"{seen[key]}); YAML would keep only the last")
        seen[key] = line
    return loader.construct_mapping(node)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _strict_mapping)


def read_yaml(path: str | Path) -> Any:
    """A config file's contents; a key given twice in one mapping is a ConfigError
    naming it and its lines."""
    with open(path) as f:
        return yaml.load(f, Loader=_StrictLoader)  # noqa: S506  (a SafeLoader subclass)


def load(path: str | Path, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Read a config file (:func:`read_yaml`), apply top-level ``overrides`` and
    :func:`prepare` it."""
    cfg = read_yaml(path) or {}
    cfg.update(overrides or {})
    return prepare(cfg)


# ------------------------------------------------------------------- per-job settings
def seeds_of(cfg: Mapping[str, Any], exp: str) -> list[int]:
    """The substitute seeds an experiment runs with (one job each)."""
    return list(cfg["experiments"][exp].get("seeds", cfg["seeds"]))


def experiment_jobs(cfg: Mapping[str, Any]) -> list[tuple[str, int]]:
    """Every (experiment, seed) job, in table order."""
    return [(exp, seed) for exp in cfg["experiments"] for seed in seeds_of(cfg, exp)]


def experiment_dir(exp: str, seed: int) -> str:
    return f"{RESULTS}/experiments/{exp}/seed{seed}"


def experiment_files(cfg: Mapping[str, Any], name: str,
                     experiments: Iterable[str] | None = None) -> list[str]:
    """``<experiment dir>/<name>`` of every job (of ``experiments``, default all)."""
    wanted = set(cfg["experiments"] if experiments is None else experiments)
    return [f"{experiment_dir(e, s)}/{name}" for e, s in experiment_jobs(cfg) if e in wanted]


#: victim name of an experiment against a served API (no victim entry: "remote:<api>")
REMOTE = "remote:"


def is_remote(cfg: Mapping[str, Any], api: str | None) -> bool:
    """Whether an API entry is a served API (``url``) rather than a victim here."""
    return api is not None and "url" in cfg["apis"].get(api, {})


def byo_victims(cfg: Mapping[str, Any]) -> list[str]:
    """Victims imported from a user's model file (``source``), not trained."""
    return sorted(v for v, entry in cfg["victims"].items() if "source" in entry)


def victim_pred_file(cfg: Mapping[str, Any], victim: str) -> str:
    """The test predictions fidelity is measured against: a victim's, or for a served
    API the API's answers on the test set (rule remote_test_predictions)."""
    if victim.startswith(REMOTE) and victim not in cfg["victims"]:
        return f"{RESULTS}/remote/{victim.removeprefix(REMOTE)}/test_predictions.pt"
    return f"{RESULTS}/victims/{victim}/test_predictions.pt"


def api_victim_inputs(cfg: Mapping[str, Any], api: str) -> dict[str, str]:
    """The victim weights a job building API ``api`` loads (none for a served API)."""
    if is_remote(cfg, api):
        return {}
    return {"victim": f"{RESULTS}/victims/{cfg['apis'][api]['victim']}/model.pt"}


def victim_of(cfg: Mapping[str, Any], exp: str) -> str:
    """Victim an experiment is measured against: its own key, its API's, or the first
    ("remote:<api>" for a served API)."""
    e = cfg["experiments"][exp]
    if "victim" in e:
        return e["victim"]
    if "api" in e:
        if is_remote(cfg, e["api"]):
            return f"{REMOTE}{e['api']}"
        return cfg["apis"][e["api"]]["victim"]
    return first_victim(cfg)


def api_victim_of(cfg: Mapping[str, Any], exp: str) -> str:
    """Victim behind the API an experiment queries."""
    return cfg["apis"][cfg["experiments"][exp]["api"]]["victim"]


def verify_api_of(cfg: Mapping[str, Any], exp: str) -> str | None:
    """Stage 3: the API whose watermark log and honest accuracy a model is checked
    against (its 'verify_api', else its own 'api'); None outside stage 3."""
    e = cfg["experiments"][exp]
    if e["stage"] != 3:
        return None
    return e.get("verify_api", e.get("api"))


def has_dawn(cfg: Mapping[str, Any], api: str) -> bool:
    return any(d["type"] == "dawn" for d in cfg["apis"][api]["defences"])


def exp_params(cfg: Mapping[str, Any], exp: str) -> dict[str, Any]:
    e = cfg["experiments"][exp]
    return {**registry.get(e["strategy"]).defaults, **e["params"]}


def query_cache(cfg: Mapping[str, Any], exp: str) -> str | None:
    """The shared query cache an experiment trains from (None: none). Caches are
    shared by every seed and every experiment that asks the same query set."""
    e = cfg["experiments"][exp]
    name = registry.query_set(e["strategy"], e["params"])
    return None if name is None else f"{RESULTS}/queries/{e['api']}/{name}.pt"


def watermark_logs(cfg: Mapping[str, Any], exp: str) -> list[str]:
    """The defender's DAWN logs a stage-3 model is verified against: those of the query
    cache it trained from (an adaptive attack adds its live API's log in its job), or,
    for a model checked against another API (a control), that API's 'pool' log."""
    api = verify_api_of(cfg, exp)
    if api is None or not has_dawn(cfg, api):
        return []
    if api == cfg["experiments"][exp].get("api"):
        cache = query_cache(cfg, exp)
        return [cache.removesuffix(".pt") + ".watermark.pt"] if cache else []
    return [f"{RESULTS}/queries/{api}/pool.watermark.pt"]


def trigger_of(cfg: Mapping[str, Any], victim: str) -> dict[str, int]:
    """A victim's trigger ({target, size}); the study's (3x3 patch, class 0) for a
    victim without a watermark."""
    wm = cfg["victims"].get(victim, {}).get("watermark") or {}
    return {"target": wm.get("target", 0), "size": wm.get("size", 3)}


def verify_settings(cfg: Mapping[str, Any], exp: str) -> dict[str, Any] | None:
    """What a stage-3 experiment is checked with (None outside stage 3)."""
    if cfg["experiments"][exp]["stage"] != 3:
        return None
    api = verify_api_of(cfg, exp)
    return {
        "trigger": trigger_of(cfg, victim_of(cfg, exp)),
        "significance": cfg["verification"]["significance"],
        "api_name": api,
        "api": cfg["apis"][api] if api else None,
        "live_log": api is not None and api == cfg["experiments"][exp].get("api"),
    }


def attack_inputs(cfg: Mapping[str, Any], exp: str) -> dict[str, Any]:
    """Named input files of an experiment's jobs (the same for every seed)."""
    e = cfg["experiments"][exp]
    inputs: dict[str, Any] = {
        "data": f"{RESULTS}/data/dataset.pt",
        "split": f"{RESULTS}/data/split.pt",
        "victim_pred": victim_pred_file(cfg, victim_of(cfg, exp)),
    }
    cache = query_cache(cfg, exp)
    if cache:
        inputs["cache"] = cache
    if registry.get(e["strategy"]).adaptive:
        inputs.update(api_victim_inputs(cfg, e["api"]))
    if watermark_logs(cfg, exp):
        inputs["watermark_logs"] = watermark_logs(cfg, exp)
    if registry.get(e["strategy"]).adaptive and defence_model_files(cfg, e["api"]):
        inputs["defence_models"] = defence_model_files(cfg, e["api"])
    verify_api = verify_api_of(cfg, exp)
    if verify_api and not is_remote(cfg, verify_api):
        inputs["verify_victim"] = f"{RESULTS}/victims/{cfg['apis'][verify_api]['victim']}/model.pt"
    return inputs


def attack_victims(cfg: Mapping[str, Any], exp: str) -> dict[str, Any]:
    """Configs of the victims an attack job loads: the one its live API wraps and the
    one behind its stage-3 verification API."""
    e = cfg["experiments"][exp]
    verify_api = verify_api_of(cfg, exp)
    return {
        "api": (cfg["victims"][api_victim_of(cfg, exp)]
                if "api" in e and not is_remote(cfg, e["api"]) else None),
        "verify": (cfg["victims"][cfg["apis"][verify_api]["victim"]]
                   if verify_api and not is_remote(cfg, verify_api) else None),
    }


def attack_settings(cfg: Mapping[str, Any], exp: str, seed: int) -> dict[str, Any]:
    """Everything that defines one (experiment, seed) result: a change reruns it."""
    e = cfg["experiments"][exp]
    settings = {
        "name": exp,
        "stage": e["stage"],
        "strategy": e["strategy"],
        "params": exp_params(cfg, exp),
        "api": cfg["apis"].get(e.get("api")),
        "api_name": e.get("api"),
        "victim": victim_of(cfg, exp),
        "substitute": e.get("substitute",
                            {k: cfg["substitute"][k] for k in ("arch", "width")}),
        "train": {**cfg["substitute"]["train"], **e.get("train", {})},
        "seed": int(seed),
        "compute": cfg["compute"],
        "verify": verify_settings(cfg, exp),
        "baseline": e.get("baseline"),
        "baseline_of": e.get("baseline_of"),
        # the attacker pool, only when it is not the split's (so that adding the key
        # reruns no existing experiment); an imagefolder root is read in the job, it
        # is not a Snakemake input
        **({"pool": e["pool"]} if (e.get("pool") or {"source": "split"})["source"] != "split"
           else {}),
    }
    # only where set: a config without a matrix leaves every job's settings as before
    if "matrix" in e:
        settings["matrix"] = e["matrix"]
    if detect_settings(cfg, exp) is not None:
        settings["detect"] = detect_settings(cfg, exp)
    return settings


#: settings that only name an (experiment, seed) result: they go into its metrics but
#: change nothing that its job computes
LABEL_SETTINGS = ("name", "stage", "baseline", "baseline_of")


def _job_key(cfg: Mapping[str, Any], exp: str) -> str:
    """What an experiment's jobs compute, without their names: every setting but
    :data:`LABEL_SETTINGS`, per seed, plus the job's input files and victims."""
    per_seed = []
    for seed in seeds_of(cfg, exp):
        settings = attack_settings(cfg, exp, seed)
        per_seed.append({k: v for k, v in settings.items() if k not in LABEL_SETTINGS})
    return json.dumps([per_seed, attack_inputs(cfg, exp), attack_victims(cfg, exp)],
                      sort_keys=True, default=str)


def twins(cfg: Mapping[str, Any]) -> dict[str, str]:
    """``{experiment: earlier experiment}`` for each experiment whose jobs would compute
    exactly what an earlier one's compute (e.g. the study's per-stage controls, or two
    equal-budget random baselines of one API): the workflow runs the first and copies
    its results under the other name (rule ``reuse_attack``), relabelled."""
    first: dict[str, str] = {}
    out: dict[str, str] = {}
    for exp in cfg["experiments"]:
        key = _job_key(cfg, exp)
        if key in first:
            out[exp] = first[key]
        else:
            first[key] = exp
    return out


def experiment_labels(cfg: Mapping[str, Any], exp: str) -> dict[str, Any]:
    """An experiment's :data:`LABEL_SETTINGS` as its metrics name them."""
    settings = attack_settings(cfg, exp, seeds_of(cfg, exp)[0])
    labels = {k: settings[k] for k in LABEL_SETTINGS}
    labels["experiment"] = labels.pop("name")
    return labels


def api_settings(cfg: Mapping[str, Any], api: str) -> dict[str, Any]:
    return {**cfg["apis"][api], "name": api}


def all_outputs(cfg: Mapping[str, Any]) -> list[str]:
    """Every file the run keeps (rule ``all`` asks for each, so a deleted or failed one
    is rebuilt, with what depends on it): each job's model, metrics and history, each
    victim's files, each query cache and its DAWN log, each defence model."""
    out = [f for name in ("model.pt", "metrics.json", "history.csv")
           for f in experiment_files(cfg, name)]
    apis = {e["api"] for e in cfg["experiments"].values() if e.get("api") in cfg["apis"]}
    local = {a for a in apis if "url" not in cfg["apis"][a]}
    victims = (set(used_victims(cfg)) | {cfg["apis"][a]["victim"] for a in local}) & set(
        cfg["victims"])
    out += [f"{RESULTS}/victims/{v}/{name}" for v in sorted(victims)
            for name in ("model.pt", "test_predictions.pt", "metrics.json", "history.csv")]
    caches = sorted({c for e in cfg["experiments"] if (c := query_cache(cfg, e))})
    out += [f for c in caches for f in (c, c.removesuffix(".pt") + ".watermark.pt")]
    out += sorted({f for a in local for f in defence_model_files(cfg, a)})
    return out


def unused_entries(cfg: Mapping[str, Any]) -> list[str]:
    """Victims and APIs that no experiment uses: the run leaves them out (no victim
    trained, no API queried). Warned about when the config is read, so that a typo in
    an experiment's ``api``/``victim`` does not pass silently."""
    apis = {e.get("api") for e in cfg["experiments"].values()}
    apis |= {e.get("verify_api") for e in cfg["experiments"].values()}
    victims = set(used_victims(cfg)) | {cfg["apis"][a]["victim"] for a in apis
                                        if a in cfg["apis"] and "victim" in cfg["apis"][a]}
    return ([f"config key 'apis.{a}': no experiment queries this API; it is left out"
             for a in cfg["apis"] if a not in apis]
            + [f"config key 'victims.{v}': no experiment or API uses this victim; it is "
               "not trained" for v in cfg["victims"] if v not in victims])


def used_victims(cfg: Mapping[str, Any]) -> list[str]:
    return sorted({victim_of(cfg, exp) for exp in cfg["experiments"]} & set(cfg["victims"]))


def stages(cfg: Mapping[str, Any]) -> list[int]:
    return sorted({int(e["stage"]) for e in cfg["experiments"].values()})


def stage_experiments(cfg: Mapping[str, Any], stage: int | str) -> list[str]:
    """The stage's experiments in its table and plots (the matrix's cells have their
    own outputs)."""
    return [e for e in table_experiments(cfg) if int(cfg["experiments"][e]["stage"]) == int(stage)]


def visible_gpus() -> int:
    """The NVIDIA GPUs this process can see, found without importing torch: the
    driver's ``/proc/driver/nvidia/gpus`` entries (else the lines of ``nvidia-smi
    -L``), limited by ``CUDA_VISIBLE_DEVICES``. ``MEXTRACT_GPUS=N`` overrides the
    count (a machine whose GPUs these cannot see)."""
    override = os.environ.get("MEXTRACT_GPUS")
    if override is not None:
        if not override.strip().isdigit():
            raise ConfigError(f"invalid configuration:\n  environment variable "
                              f"MEXTRACT_GPUS: '{override}' is not a GPU count")
        return int(override)
    proc = Path("/proc/driver/nvidia/gpus")
    if proc.is_dir():
        count = sum(1 for _ in proc.iterdir())
    elif shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True,
                                 timeout=30, check=False).stdout
        except (OSError, subprocess.SubprocessError):
            out = ""
        count = sum(1 for line in out.splitlines() if line.startswith("GPU "))
    else:
        count = 0
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:  # CUDA stops at the first negative id ("-1": none)
        ids = []
        for item in visible.split(","):
            if not item.strip() or item.strip().startswith("-"):
                break
            ids.append(item)
        count = min(count, len(ids))
    return count


def device_problems(device: str) -> list[str]:
    """An explicit ``cuda``/``cuda:N`` device that this machine cannot give, as a
    message naming ``compute.device`` (``auto`` and ``cpu`` always run). Checked by
    the workflow when it reads the config, so a run that would fail in every GPU job
    stops before any job (and before Snakemake removes any finished output)."""
    if not device.startswith("cuda"):
        return []
    index = int(device.partition(":")[2] or 0)
    count = visible_gpus()
    if count == 0:
        return [f"config key 'compute.device': '{device}', but this machine shows no "
                "NVIDIA GPU; use 'auto' (a GPU where there is one, else the CPU) or "
                "'cpu'. Submitting from a machine without a GPU to GPU nodes: keep "
                "'auto' (each job uses its node's GPU), or set MEXTRACT_GPUS to the "
                "nodes' GPU count"]
    if index >= count:
        return [f"config key 'compute.device': '{device}', but this machine shows "
                f"{count} GPU(s): cuda:0 to cuda:{count - 1}"]
    return []


def gpu_units(device: str) -> int:
    """The ``gpu`` resource units of each GPU job: 1 when its jobs compute on a GPU, so
    that ``--resources gpu=N`` runs at most N of them at once; 0 when the config
    computes on the CPU (device 'cpu', or 'auto' on a machine without an NVIDIA
    driver), where a unit would serialise CPU jobs for nothing. A cluster profile's
    set-resources (profiles/slurm) overrides this for the compute nodes."""
    if device == "cpu":
        return 0
    if device == "auto":
        return int(visible_gpus() > 0)
    return 1
