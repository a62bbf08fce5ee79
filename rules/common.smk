"""Config validation and helpers shared by every rule file (no rules here)."""

import copy
import hashlib
import os
import re
import shutil
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
from mextract.report import STAGE_TITLES  # noqa: E402  (torch-free)

# `--configfile X` *replaces* config/config.yaml instead of being deep-merged into it
# (Snakemake's default merge would add the full study's experiments to a demo run).
if workflow.config_settings.configfiles:
    config.clear()
    config.update(copy.deepcopy(workflow.config_settings.overwrite_config))

RESULTS = "results"
ENV = "../envs/mextract.yaml"

# Jobs inherit this: idle OpenMP threads sleep instead of spinning, so host-side work
# between training steps is not starved on a small CPU (docs/performance.md, "OpenMP
# on a busy machine"). A value already set wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


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
        types = [d["type"] for d in api["defences"]]
        if types and api["mode"] == "soft":
            problems.append(
                f"config key 'apis.{name}.defences': defence layers act on hard labels; "
                f"set 'apis.{name}.mode' to hard or honey"
            )
        if "dawn" in types[:-1]:
            problems.append(
                f"config key 'apis.{name}.defences.{types.index('dawn')}': the dawn layer "
                "must be the last layer (it logs the labels it serves)"
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
        if "verify_api" in exp:
            if exp["stage"] != 3:
                problems.append(
                    f"config key '{where}.verify_api': only stage-3 experiments are "
                    f"verified (this one has stage {exp['stage']})"
                )
            elif exp["verify_api"] not in cfg["apis"]:
                problems.append(
                    f"config key '{where}.verify_api': '{exp['verify_api']}' is not an "
                    f"entry of 'apis' (defined: {', '.join(cfg['apis']) or 'none'})"
                )
        elif exp["stage"] == 3 and "api" not in exp:
            problems.append(
                f"config key '{where}.verify_api': a stage-3 experiment that never "
                "queries needs the API whose watermark it is checked against"
            )
    return problems


def cfg_first_victim(cfg):
    return next(iter(cfg["victims"]))


# ---------------------------------------------------------------- code fingerprints
_IMPORT = re.compile(
    r"^\s*(?:from\s+mextract\.([\w.]+)\s+import|import\s+mextract\.([\w.]+)"
    r"|from\s+mextract\s+import\s+([\w, ]+))",
    re.M,
)


def library_closure(*modules):
    """The given library modules (paths relative to src/mextract, no .py) and every
    library module they import, transitively. A strategy module (attacks/<name>) is
    included only when named, so one strategy's change never reruns another's
    experiments (queries.py imports augmentation's view maker lazily, for example)."""
    todo, seen = list(modules), set()
    while todo:
        name = todo.pop()
        path = SRC / "mextract" / f"{name}.py"
        strategy = name.startswith("attacks/") and name != "attacks/base"
        if name in seen or not path.exists() or (strategy and name not in modules):
            continue
        seen.add(name)
        for dotted, plain, names in _IMPORT.findall(path.read_text()):
            found = [dotted or plain] if (dotted or plain) else names.split(",")
            todo.extend(f.strip().replace(".", "/") for f in found if f.strip())
    return sorted(seen)


def code_fingerprint(*modules):
    """sha256 over the source of library modules and of everything they import
    (:func:`library_closure`). Passed as a param, so changed code reruns exactly the
    rules that use it."""
    h = hashlib.sha256()
    for name in library_closure(*modules):
        h.update(name.encode())
        h.update((SRC / "mextract" / f"{name}.py").read_bytes())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------- paths and lookups
def victim_of(exp):
    """Victim an experiment is measured against: its own key, its API's, or the first."""
    e = config["experiments"][exp]
    if "victim" in e:
        return e["victim"]
    if "api" in e:
        return config["apis"][e["api"]]["victim"]
    return cfg_first_victim(config)


def api_victim_of(exp):
    """Victim behind the API an experiment queries (the model an adaptive API wraps)."""
    return config["apis"][config["experiments"][exp]["api"]]["victim"]


def verify_api_of(exp):
    """Stage 3: the API whose watermark log and honest accuracy a model is checked
    against (its 'verify_api', else its own 'api'); None outside stage 3."""
    e = config["experiments"][exp]
    if e["stage"] != 3:
        return None
    return e.get("verify_api", e.get("api"))


def has_dawn(api):
    return any(d["type"] == "dawn" for d in config["apis"][api]["defences"])


def watermark_logs(exp):
    """The defender's DAWN logs a stage-3 model is verified against: those of the query
    cache it trained from (an adaptive attack adds its live API's log in its job), or,
    for a model checked against another API (a control), that API's 'pool' log."""
    api = verify_api_of(exp)
    if api is None or not has_dawn(api):
        return []
    if api == config["experiments"][exp].get("api"):
        return [
            c.removesuffix(".pt") + ".watermark.pt" for c in [query_cache(exp)] if c
        ]
    return [f"{RESULTS}/queries/{api}/pool.watermark.pt"]


def trigger_of(victim):
    """A victim's trigger ({target, size}); the study's (3x3 patch, class 0) for a
    victim without a watermark."""
    wm = config["victims"][victim].get("watermark") or {}
    return {"target": wm.get("target", 0), "size": wm.get("size", 3)}


def verify_settings(exp):
    """What a stage-3 experiment is checked with (None outside stage 3)."""
    if config["experiments"][exp]["stage"] != 3:
        return None
    api = verify_api_of(exp)
    return {
        "trigger": trigger_of(victim_of(exp)),
        "significance": config["verification"]["significance"],
        "api_name": api,
        "api": config["apis"][api] if api else None,
        "live_log": api is not None and api == config["experiments"][exp].get("api"),
    }


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
        inputs["victim"] = f"{RESULTS}/victims/{api_victim_of(exp)}/model.pt"
    if watermark_logs(exp):
        inputs["watermark_logs"] = watermark_logs(exp)
    if verify_api_of(exp):
        victim = config["apis"][verify_api_of(exp)]["victim"]
        inputs["verify_victim"] = f"{RESULTS}/victims/{victim}/model.pt"
    return inputs


def attack_victims(exp):
    """Configs of the victims an attack job loads: the one its adaptive API wraps and
    the one behind its stage-3 verification API."""
    e = config["experiments"][exp]
    return {
        "api": config["victims"][api_victim_of(exp)] if "api" in e else None,
        "verify": (
            config["victims"][config["apis"][verify_api_of(exp)]["victim"]]
            if verify_api_of(exp)
            else None
        ),
    }


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
        "verify": verify_settings(exp),
    }


def attack_code(wildcards):
    """The experiment runner, the strategy's module and all they import."""
    source = f"attacks/{exp_strategy(wildcards.exp).source.stem}"
    return code_fingerprint("experiment", source)


def queries_code(wildcards):
    extra = ("attacks/augmentation",) if wildcards.qset.startswith("views") else ()
    return code_fingerprint("queries", "experiment", *extra)


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


def _canonical(value):
    """Dicts with sorted keys, recursively: params compare equal however the config
    file orders its keys, so reordering a config never triggers a rerun."""
    if isinstance(value, dict):
        return {k: _canonical(value[k]) for k in sorted(value)}
    if isinstance(value, list):
        return [_canonical(v) for v in value]
    return value


validate_config(config)


def _gpu_units(device):
    """The `gpu` units of each GPU job, 1 when its jobs compute on a GPU, so that
    `--resources gpu=N` runs at most N of them at once; 0 when the config computes
    on the CPU (device 'cpu', or 'auto' on a machine without an NVIDIA driver), where
    a unit would serialise CPU jobs for nothing. A cluster profile's set-resources
    (profiles/slurm) overrides this for the compute nodes."""
    if device == "cpu":
        return 0
    if device == "auto":
        return int(bool(shutil.which("nvidia-smi")))
    return 1


GPU = _gpu_units(config["compute"]["device"])
# Experiments keep their config order (the table's row order); all else is sorted.
for _key_name in [k for k in config if k != "experiments"]:
    config[_key_name] = _canonical(config[_key_name])
config["experiments"] = {
    name: _canonical(exp) for name, exp in config["experiments"].items()
}


# ---------------------------------------------------------------- report helpers
REFERENCE = "config/reference.yaml"  # the reference study's numbers (one data file)
# Stages present in this config; the figures are one set per stage, with fixed names.
STAGES = sorted({int(e["stage"]) for e in config["experiments"].values()})


def stage_title(stage):
    return f"Stage {stage}: {STAGE_TITLES[int(stage)]}"


def stage_experiments(stage):
    return [
        e for e, v in config["experiments"].items() if int(v["stage"]) == int(stage)
    ]


def stage_files(wildcards, name):
    return expand(
        f"{RESULTS}/experiments/{{exp}}/{name}", exp=stage_experiments(wildcards.stage)
    )


STAGE_PLOTS = expand(
    f"{RESULTS}/report/stage{{stage}}_{{plot}}.{{ext}}",
    stage=STAGES,
    plot=["fidelity_vs_queries", "accuracy_fidelity"],
    ext=["png", "svg"],
)
VICTIM_PLOTS = expand(f"{RESULTS}/report/victims_training.{{ext}}", ext=["png", "svg"])
