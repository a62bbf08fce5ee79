"""What the rules need from the config: the library's config functions, bound to this
run's config (src/mextract/config.py holds the logic and is tested on its own)."""

import copy
import os
import re
import shlex
import sys
from pathlib import Path

# The workflow reads the (torch-free) config and registry modules from this checkout;
# jobs' scripts put the same src/ first on their path, so local, conda and cluster jobs
# all run this checkout's library.
sys.path.insert(0, str(Path(workflow.basedir) / "src"))
from mextract import config as mc  # noqa: E402
from mextract.fingerprint import fingerprint  # noqa: E402
from mextract.report import STAGE_TITLES  # noqa: E402  (torch-free)

# Snakemake's YAML loader keeps the last of two equal keys silently: read each config
# file again with one that refuses them (naming the key and its lines).
for _path in workflow.config_settings.configfiles or [
    Path(workflow.basedir) / "config/config.yaml"
]:
    mc.read_yaml(_path)
# `--configfile X` *replaces* config/config.yaml instead of being deep-merged into it
# (Snakemake's default merge would add the full study's experiments to a demo run).
if workflow.config_settings.configfiles:
    config.clear()
    config.update(copy.deepcopy(workflow.config_settings.overwrite_config))
# Validated, completed with config/schema.yaml's defaults, random baselines added;
# raises a ConfigError naming every bad key before any job starts.
_prepared = mc.prepare(config)
config.clear()
config.update(_prepared)

# An explicit CUDA device that this machine cannot give stops the run here, before any
# job (on a cluster, the check_device job checks a GPU node: rules/device.smk).
_problems = mc.device_problems(config["compute"]["device"])
if workflow.is_main_process and _problems:
    raise mc.ConfigError("invalid configuration:\n  " + "\n  ".join(_problems))
# victims and APIs no experiment uses are left out: say so (a typo in an experiment's
# api or victim would otherwise pass silently)
if workflow.is_main_process:
    for _line in mc.unused_entries(config):
        print(f"warning: {_line}", file=sys.stderr)

RESULTS = mc.RESULTS
ENV = "../envs/mextract.yaml"
GPU = mc.gpu_units(config["compute"]["device"])
# With an explicit CUDA device every GPU job waits for check_device (a temp file);
# where the device fails there, no GPU job starts, so Snakemake removes no finished
# output of a job that was bound to fail. 'auto' and 'cpu' always run: no check.
DEVICE_OK = (
    [f"{RESULTS}/checks/device.ok"]
    if config["compute"]["device"].startswith("cuda")
    else []
)
# the reference study's numbers (one data file of the workflow, whatever --directory)
REFERENCE = str(Path(workflow.basedir) / "config" / "reference.yaml")
STAGES = mc.stages(config)


def attack_inputs(wc):
    return mc.attack_inputs(config, wc.exp)


def attack_code(wc):
    """The experiment runner, the strategy's module and all they import."""
    strategy = config["experiments"][wc.exp]["strategy"]
    return fingerprint("experiment", f"attacks/{mc.registry.get(strategy).source.stem}")


# experiments whose jobs compute what an earlier experiment's do (mc.twins): rule
# reuse_attack copies that one's results instead of training the same model again
TWINS = mc.twins(config)
TWIN_NAMES = "|".join(re.escape(name) for name in TWINS) or "(?!x)x"


def twin_files(wc):
    twin = TWINS[wc.exp]
    return {
        name: f"{mc.experiment_dir(twin, wc.seed)}/{name}.{ext}"
        for name, ext in (("model", "pt"), ("metrics", "json"), ("history", "csv"))
    }


def queries_code(wc):
    extra = ("attacks/augmentation",) if wc.qset.startswith("views") else ()
    return fingerprint("queries", "experiment", *extra)


def api_victim(wc):
    return config["apis"][wc.api]["victim"]


def stage_title(stage):
    return f"Stage {stage}: {STAGE_TITLES[int(stage)]}"


def stage_files(wc, name):
    return mc.experiment_files(config, name, mc.stage_experiments(config, wc.stage))


STAGE_PLOTS = expand(
    f"{RESULTS}/report/stage{{stage}}_{{plot}}.{{ext}}",
    stage=STAGES,
    plot=["fidelity_vs_queries", "accuracy_fidelity"],
    ext=["png", "svg"],
)
VICTIM_PLOTS = expand(f"{RESULTS}/report/victims_training.{{ext}}", ext=["png", "svg"])
# the defence matrix's outputs (rules/matrix.smk), when the config has one
MATRIX = [f"{RESULTS}/matrix.md"] if config.get("matrix") else []
VICTIM_METRICS = expand(
    f"{RESULTS}/victims/{{victim}}/metrics.json", victim=mc.used_victims(config)
)


def run_command(page=None):
    """The snakemake command line for a generated results page: its target (none for
    `all`'s page, summary.md) and config part. The number of cores is not part of it:
    each job's threads are in the config."""
    parts = ["snakemake"]
    if page is not None and Path(page).name != "summary.md":
        parts.append(page)
    for path in workflow.config_settings.configfiles:
        parts += ["--configfile", os.path.relpath(path)]
    if workflow.config_settings.config_args:
        parts += ["--config", *map(shlex.quote, workflow.config_settings.config_args)]
    return " ".join(parts)
