"""Config validation and helpers shared by every rule file (no rules here)."""

import copy
import hashlib
import sys
from pathlib import Path

import jsonschema
import yaml

SRC = Path(workflow.basedir) / "src"
# The workflow reads the (torch-free) registry from this checkout; jobs' scripts put
# the same src/ first on their path, so local, conda and cluster jobs all run this
# checkout's library.
sys.path.insert(0, str(SRC))
from mextract.attacks import registry  # noqa: E402  (torch-free)

# `--configfile X` *replaces* config/config.yaml instead of being deep-merged into it
# (Snakemake's default merge would add the full study's experiments to a demo run).
if workflow.config_settings.configfiles:
    config.clear()
    config.update(copy.deepcopy(workflow.config_settings.overwrite_config))

RESULTS = "results"
ENV = "../envs/mextract.yaml"


class ConfigError(ValueError):
    pass


def _with_defaults(cls):
    """A jsonschema validator class that fills in each property's ``default``."""
    validate_properties = cls.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for key, sub in properties.items():
                if "default" in sub and key not in instance:
                    instance[key] = copy.deepcopy(sub["default"])
        yield from validate_properties(validator, properties, instance, schema)

    return jsonschema.validators.extend(cls, {"properties": set_defaults})


def _lift_ref_defaults(node, defs):
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


def _key(path):
    return ".".join(str(p) for p in path) or "<top level>"


def validate_config(cfg):
    """Check the config against config/schema.yaml (filling defaults), then the
    cross-references the schema cannot express. Raises ConfigError naming each bad key.
    """
    with open(Path(workflow.basedir) / "config" / "schema.yaml") as f:
        schema = yaml.safe_load(f)
    _lift_ref_defaults(schema, schema.get("$defs", {}))
    validator = _with_defaults(jsonschema.Draft202012Validator)(schema)
    problems = [
        f"config key '{_key(e.absolute_path)}': {e.message}"
        for e in sorted(
            validator.iter_errors(cfg), key=lambda e: list(map(str, e.path))
        )
    ]
    if not problems:
        problems = _check_references(cfg)
    if problems:
        listing = "\n  ".join(problems)
        raise ConfigError(f"invalid configuration:\n  {listing}")


def _check_references(cfg):
    problems = []
    for name, api in cfg["apis"].items():
        if api["victim"] not in cfg["victims"]:
            problems.append(
                f"config key 'apis.{name}.victim': unknown victim '{api['victim']}' "
                f"(defined: {', '.join(cfg['victims'])})"
            )
    for name, exp in cfg["experiments"].items():
        where = f"experiments.{name}"
        if exp["strategy"] not in registry.STRATEGIES:
            problems.append(
                f"config key '{where}.strategy': unknown strategy '{exp['strategy']}' "
                f"(known: {', '.join(sorted(registry.STRATEGIES))})"
            )
            continue
        strategy = registry.get(exp["strategy"])
        for key, msg in registry.check_params(exp["strategy"], exp["params"]):
            problems.append(f"config key '{where}.params.{key}': {msg}")
        if strategy.answers is None:
            if "api" in exp:
                problems.append(
                    f"config key '{where}.api': '{exp['strategy']}' never queries"
                )
        elif exp.get("api") not in cfg["apis"]:
            problems.append(
                f"config key '{where}.api': '{exp.get('api')}' is not an entry of 'apis' "
                f"(defined: {', '.join(cfg['apis']) or 'none'})"
            )
        else:
            mode = cfg["apis"][exp["api"]]["mode"]
            kind = "soft" if mode == "soft" else "hard"
            if kind != strategy.answers:
                problems.append(
                    f"config key '{where}.api': strategy '{exp['strategy']}' needs "
                    f"{strategy.answers} answers, API '{exp['api']}' gives {kind}"
                )
        if exp.get("victim", cfg_first_victim(cfg)) not in cfg["victims"]:
            problems.append(
                f"config key '{where}.victim': unknown victim '{exp['victim']}'"
            )
    return problems


def cfg_first_victim(cfg):
    return next(iter(cfg["victims"]))


# ---------------------------------------------------------------- code fingerprints
def code_fingerprint(*modules):
    """sha256 over library source files (module paths relative to src/mextract, no
    .py). Passed as a param, so changed code reruns exactly the rules that use it."""
    h = hashlib.sha256()
    for name in sorted(set(modules)):
        path = SRC / "mextract" / f"{name}.py"
        h.update(name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


CORE = ("io", "compute", "models", "train", "metrics", "augment")


# ---------------------------------------------------------------- paths and lookups
def victim_of(exp):
    """Victim an experiment is measured against: its own key, its API's, or the first."""
    e = config["experiments"][exp]
    if "victim" in e:
        return e["victim"]
    if "api" in e:
        return config["apis"][e["api"]]["victim"]
    return cfg_first_victim(config)


def exp_params(exp):
    e = config["experiments"][exp]
    return {**registry.get(e["strategy"]).defaults, **e["params"]}


def exp_strategy(exp):
    return registry.get(config["experiments"][exp]["strategy"])


def query_cache(exp):
    """The shared query cache an experiment trains from ([] for none)."""
    e = config["experiments"][exp]
    name = registry.query_set(e["strategy"], e["params"])
    return [] if name is None else f"{RESULTS}/queries/{e['api']}/{name}.pt"


def attack_inputs(wildcards):
    exp = wildcards.exp
    inputs = {
        "data": f"{RESULTS}/data/dataset.pt",
        "split": f"{RESULTS}/data/split.pt",
        "victim_pred": f"{RESULTS}/victims/{victim_of(exp)}/test_predictions.pt",
    }
    if query_cache(exp):
        inputs["cache"] = query_cache(exp)
    if exp_strategy(exp).adaptive:
        inputs["victim"] = f"{RESULTS}/victims/{victim_of(exp)}/model.pt"
    return inputs


def attack_settings(exp):
    """Everything that defines an experiment's result (a change reruns it)."""
    e = config["experiments"][exp]
    return {
        "name": exp,
        "stage": e["stage"],
        "strategy": e["strategy"],
        "params": exp_params(exp),
        "api": config["apis"].get(e.get("api"), None),
        "api_name": e.get("api"),
        "victim": victim_of(exp),
        "substitute": e.get(
            "substitute",
            {k: config["substitute"][k] for k in ("arch", "width")},
        ),
        "train": {**config["substitute"]["train"], **e.get("train", {})},
        "seed": e.get("seed", config["seed"]),
        "compute": config["compute"],
    }


def attack_code(wildcards):
    strategy = exp_strategy(wildcards.exp)
    source = f"attacks/{strategy.source.stem}"
    return code_fingerprint(
        *CORE, "api", "defences", "queries", "experiment", "attacks/base", source
    )


def queries_code(wildcards):
    extra = ("attacks/augmentation",) if wildcards.qset.startswith("views") else ()
    return code_fingerprint(*CORE, "api", "defences", "queries", *extra)


def api_settings(wildcards):
    return {**config["apis"][wildcards.api], "name": wildcards.api}


def used_caches():
    return sorted({c for exp in config["experiments"] for c in [query_cache(exp)] if c})


def experiment_metrics():
    return expand(
        f"{RESULTS}/experiments/{{exp}}/metrics.json", exp=config["experiments"]
    )


def used_victims():
    return sorted({victim_of(exp) for exp in config["experiments"]})


validate_config(config)
