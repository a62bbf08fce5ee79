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
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from mextract import defaults
from mextract.attacks import registry

#: config/schema.yaml of this checkout (the only home of defaults)
SCHEMA = defaults.SCHEMA
RESULTS = "results"
#: name suffix of the equal-budget random baseline added for an adaptive experiment
BASELINE_SUFFIX = "-random"


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


def cross_check(cfg: Mapping[str, Any]) -> list[str]:
    """The references the schema cannot express, as messages naming each bad key."""
    problems = []
    if cfg["dataset"]["name"] == "imagefolder" and not cfg["split"]["shuffle"]:
        problems.append(
            "config key 'split.shuffle': an imagefolder data set is read sorted by class, "
            "so an unshuffled split would give the victim and the pool different classes; "
            "set split.shuffle: true")
    for name, api in cfg["apis"].items():
        if api["victim"] not in cfg["victims"]:
            problems.append(
                f"config key 'apis.{name}.victim': unknown victim '{api['victim']}' "
                f"(defined: {', '.join(cfg['victims'])})")
        types = [d["type"] for d in api["defences"]]
        # label layers (= mextract.defence_specs.LABEL_TYPES, not imported: that module
        # is outside this module's torch-free closure test) need hard answers and come
        # after every probability layer
        label_types = ("honey", "dawn")
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
        if strategy.baseline is None:
            continue
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
    problems = cross_check(out)
    if problems:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(problems))
    # experiments keep their order (the table's row order); everything else is sorted
    experiments = {name: canonical(exp) for name, exp in out.pop("experiments").items()}
    out = canonical(out)
    out["experiments"] = experiments
    return out


def load(path: str | Path, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Read a config file, apply top-level ``overrides`` and :func:`prepare` it."""
    with open(path) as f:
        cfg = yaml.safe_load(f) or {}
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


def victim_of(cfg: Mapping[str, Any], exp: str) -> str:
    """Victim an experiment is measured against: its own key, its API's, or the first."""
    e = cfg["experiments"][exp]
    if "victim" in e:
        return e["victim"]
    if "api" in e:
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
    wm = cfg["victims"][victim].get("watermark") or {}
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
        "victim_pred": f"{RESULTS}/victims/{victim_of(cfg, exp)}/test_predictions.pt",
    }
    cache = query_cache(cfg, exp)
    if cache:
        inputs["cache"] = cache
    if registry.get(e["strategy"]).adaptive:
        inputs["victim"] = f"{RESULTS}/victims/{api_victim_of(cfg, exp)}/model.pt"
    if watermark_logs(cfg, exp):
        inputs["watermark_logs"] = watermark_logs(cfg, exp)
    verify_api = verify_api_of(cfg, exp)
    if verify_api:
        inputs["verify_victim"] = f"{RESULTS}/victims/{cfg['apis'][verify_api]['victim']}/model.pt"
    return inputs


def attack_victims(cfg: Mapping[str, Any], exp: str) -> dict[str, Any]:
    """Configs of the victims an attack job loads: the one its live API wraps and the
    one behind its stage-3 verification API."""
    e = cfg["experiments"][exp]
    verify_api = verify_api_of(cfg, exp)
    return {
        "api": cfg["victims"][api_victim_of(cfg, exp)] if "api" in e else None,
        "verify": cfg["victims"][cfg["apis"][verify_api]["victim"]] if verify_api else None,
    }


def attack_settings(cfg: Mapping[str, Any], exp: str, seed: int) -> dict[str, Any]:
    """Everything that defines one (experiment, seed) result: a change reruns it."""
    e = cfg["experiments"][exp]
    return {
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
    }


def api_settings(cfg: Mapping[str, Any], api: str) -> dict[str, Any]:
    return {**cfg["apis"][api], "name": api}


def used_victims(cfg: Mapping[str, Any]) -> list[str]:
    return sorted({victim_of(cfg, exp) for exp in cfg["experiments"]})


def stages(cfg: Mapping[str, Any]) -> list[int]:
    return sorted({int(e["stage"]) for e in cfg["experiments"].values()})


def stage_experiments(cfg: Mapping[str, Any], stage: int | str) -> list[str]:
    return [e for e, v in cfg["experiments"].items() if int(v["stage"]) == int(stage)]


def gpu_units(device: str) -> int:
    """The ``gpu`` resource units of each GPU job: 1 when its jobs compute on a GPU, so
    that ``--resources gpu=N`` runs at most N of them at once; 0 when the config
    computes on the CPU (device 'cpu', or 'auto' on a machine without an NVIDIA
    driver), where a unit would serialise CPU jobs for nothing. A cluster profile's
    set-resources (profiles/slurm) overrides this for the compute nodes."""
    if device == "cpu":
        return 0
    if device == "auto":
        return int(bool(shutil.which("nvidia-smi")))
    return 1
