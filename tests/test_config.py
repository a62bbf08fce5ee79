"""The config logic (mextract.config): bad configurations fail naming the bad key, the
three shipped configs name the same experiments, every experiment runs per seed, and
every adaptive strategy gets an equal-budget random baseline. Plain function calls:
no Snakemake subprocess (milliseconds each)."""

from __future__ import annotations

import copy

import pytest
import yaml
from conftest import ROOT

from mextract import config as mc
from mextract.attacks import registry

CONFIGS = {name: yaml.safe_load((ROOT / "config" / f"{name}.yaml").read_text())
           for name in ("config", "cifar10-cpu", "demo")}
DEMO = CONFIGS["demo"]


def edited(edit) -> dict:
    cfg = copy.deepcopy(DEMO)
    edit(cfg)
    return cfg


CASES = {
    "unknown strategy": (
        lambda c: c["experiments"]["kd"].update(strategy="telepathy"),
        ["experiments.kd.strategy", "telepathy"],
    ),
    "negative budget": (
        lambda c: c["experiments"]["marich"]["params"].update(budget=-5),
        ["experiments.marich.params.budget", "-5"],
    ),
    "unknown parameter": (
        lambda c: c["experiments"]["kd"]["params"].update(budgett=5),
        ["experiments.kd.params", "budgett"],
    ),
    "fractional integer parameter": (
        lambda c: c["experiments"]["boundary"]["params"].update(steps=2.5),
        ["experiments.boundary.params.steps", "2.5"],
    ),
    "misspelt key": (
        lambda c: c["victims"]["clean"]["train"].update(epochz=3),
        ["victims.clean.train", "epochz"],
    ),
    "fraction outside (0, 1)": (
        lambda c: c["split"].update(victim_fraction=1.5),
        ["split.victim_fraction", "1.5"],
    ),
    "zero fraction": (lambda c: c["split"].update(victim_fraction=0), ["split.victim_fraction"]),
    "unknown api": (
        lambda c: c["experiments"]["kd"].update(api="oracle"),
        ["experiments.kd.api", "oracle"],
    ),
    "soft strategy on hard api": (
        lambda c: c["experiments"]["kd"].update(api="hard"),
        ["experiments.kd.api", "soft"],
    ),
    "empty seeds": (lambda c: c.update(seeds=[]), ["seeds"]),
    "repeated seed": (lambda c: c.update(seeds=[1, 1]), ["seeds"]),
    "dawn not last": (
        lambda c: c["apis"]["defended"].update(defences=list(
            reversed(c["apis"]["defended"]["defences"]))),
        ["apis.defended.defences", "last"],
    ),
    "unshuffled image folder": (
        lambda c: c.update(dataset={"name": "imagefolder", "root": "x"},
                           split={"shuffle": False}),
        ["split.shuffle"],
    ),
    "reserved baseline name": (
        lambda c: c["experiments"].update({"marich-random": {"stage": 1, "strategy": "control"}}),
        ["experiments.marich-random", "reserved"],
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_config_fails_naming_the_key(case):
    edit, needles = CASES[case]
    with pytest.raises(mc.ConfigError) as err:
        mc.prepare(edited(edit))
    message = str(err.value)
    assert message.startswith("invalid configuration")
    for needle in needles:
        assert needle in message, f"{needle!r} not named in:\n{message}"


def test_defaults_come_from_the_schema():
    cfg = mc.prepare({"experiments": {"c": {"stage": 1, "strategy": "control"}}})
    schema = mc.load_schema()
    assert cfg["seeds"] == schema["properties"]["seeds"]["default"]
    assert cfg["substitute"]["train"]["epochs"] == schema["$defs"]["train"]["properties"][
        "epochs"]["default"]
    assert cfg["compute"]["threads"] == schema["properties"]["compute"]["properties"][
        "threads"]["default"]


def test_the_three_configs_name_the_same_experiments():
    names = {name: mc.table_experiments(mc.prepare(cfg)) for name, cfg in CONFIGS.items()}
    assert names["config"] == names["cifar10-cpu"] == names["demo"]
    # the defence matrix: the full one in both CIFAR-10 configs, a part of it in the demo
    full, cpu, demo = (mc.prepare(CONFIGS[n])["matrix"] for n in ("config", "cifar10-cpu",
                                                                   "demo"))
    assert full["defences"] == cpu["defences"] and full["attacks"] == cpu["attacks"]
    assert set(demo["defences"]) <= set(full["defences"])
    assert set(demo["attacks"]) <= set(full["attacks"])
    assert len(demo["defences"]) - 1 >= 3 and len(demo["attacks"]) >= 3  # 3 x 3 at least
    # every defence layer but DAWN (a watermark for verification, in Stage 3) against
    # kd, basic, augmentation and MARICH
    from mextract.defences import LAYERS

    used = {layer["type"] for stack in cpu["defences"].values() for layer in stack}
    assert used == set(LAYERS) - {"dawn"}
    assert cpu["attacks"] == ["kd", "basic", "augmentation", "marich"]
    stages = {e["stage"] for e in mc.prepare(CONFIGS["config"])["experiments"].values()}
    assert stages == {1, 2, 3}
    strategies = {e["strategy"] for e in mc.prepare(CONFIGS["config"])["experiments"].values()}
    assert strategies == set(registry.STRATEGIES)  # every strategy of the study is run


def test_full_config_is_at_the_study_scale():
    cfg = mc.prepare(CONFIGS["config"])
    assert cfg["victims"]["clean"]["arch"] == "resnet18"
    assert cfg["victims"]["clean"]["width"] == 64
    assert cfg["victims"]["clean"]["train"]["epochs"] == 50
    assert "watermark" in cfg["victims"]["watermarked"]
    assert (cfg["substitute"]["arch"], cfg["substitute"]["width"]) == ("vgg11", 1.0)
    assert cfg["substitute"]["train"]["epochs"] == 40
    budgets = {e["strategy"]: mc.exp_params(cfg, n).get("budget")
               for n, e in cfg["experiments"].items()}
    assert (budgets["marich"], budgets["spsg"], budgets["active_learning"]) == (4785, 3203, 3000)
    assert [d["type"] for d in cfg["apis"]["defended"]["defences"]] == ["honey", "dawn"]
    assert len(cfg["seeds"]) == 2
    assert len(mc.prepare(CONFIGS["cifar10-cpu"])["seeds"]) == 2


def test_every_experiment_runs_once_per_seed():
    cfg = mc.prepare({**DEMO, "seeds": [3, 7]})
    jobs = mc.experiment_jobs(cfg)
    assert len(jobs) == 2 * len(cfg["experiments"])
    assert {s for _, s in jobs} == {3, 7}
    files = mc.experiment_files(cfg, "metrics.json")
    assert "results/experiments/kd/seed7/metrics.json" in files
    assert mc.attack_settings(cfg, "kd", 7)["seed"] == 7
    assert mc.attack_settings(cfg, "kd", 3)["params"] == mc.attack_settings(cfg, "kd", 7)["params"]


def test_random_baseline_beside_every_adaptive_strategy():
    cfg = mc.prepare(DEMO)
    exps = cfg["experiments"]
    adaptive = [n for n, e in exps.items() if registry.get(e["strategy"]).baseline]
    assert set(adaptive) == {"marich", "spsg", "active_learning", "boundary", "boundary-s3",
                             "knockoff-adaptive"}
    names = list(exps)
    for name in adaptive:
        twin = exps[name]["baseline"]
        base = exps[twin]
        assert names.index(twin) == names.index(name) + 1  # right below it in the table
        assert base["baseline_of"] == name
        assert base["api"] == exps[name]["api"] and base["stage"] == exps[name]["stage"]
        assert base.get("train") == exps[name].get("train")
        strategy = registry.get(exps[name]["strategy"])
        for key in strategy.baseline_params:  # the same budget
            assert mc.exp_params(cfg, twin)[key] == mc.exp_params(cfg, name)[key]
    assert mc.exp_params(cfg, "marich-random")["budget"] == 300
    assert exps["boundary-random"]["strategy"] == "random_boundary"
    # preparing twice changes nothing (jobs re-parse the workflow with its config)
    assert mc.prepare(copy.deepcopy(cfg)) == cfg
    assert mc.table_experiments(mc.prepare({**DEMO, "random_baselines": False})) == list(
        DEMO["experiments"])


def test_experiments_that_compute_the_same_run_once():
    """Two experiments whose jobs would compute the same (every setting but the name,
    stage and baseline links, the same inputs and victims) are twins: the later one
    copies the earlier one's results (rule reuse_attack) instead of training again."""
    cfg = mc.prepare(DEMO)
    # the per-stage controls of one victim, and the demo's two 300-query soft baselines
    assert mc.twins(cfg) == {"control-s2": "control-s1", "spsg-random": "marich-random"}
    labels = mc.experiment_labels(cfg, "spsg-random")
    assert labels == {"experiment": "spsg-random", "stage": 1, "baseline": None,
                      "baseline_of": "spsg"}
    # anything a job computes with makes them two experiments again
    for change in ({"train": {"epochs": 3}}, {"params": {"budget": 301}},
                   {"seeds": [1]}):
        raw = copy.deepcopy(DEMO)
        name = "control-s2" if "budget" not in change.get("params", {}) else "spsg"
        raw["experiments"][name].update(change)
        twins = mc.twins(mc.prepare(raw))
        changed = name if name.startswith("control") else "spsg-random"
        assert changed not in twins, (change, twins)
    # a control checked against another victim (control-s3: the watermarked one) is not
    # a twin: its fidelity is measured against that victim
    assert "control-s3" not in mc.twins(cfg)


def test_config_key_order_does_not_change_settings():
    shuffled = copy.deepcopy(DEMO)
    shuffled["split"] = dict(reversed(list(shuffled["split"].items())))
    shuffled["experiments"]["kd"] = dict(reversed(list(shuffled["experiments"]["kd"].items())))
    a, b = mc.prepare(DEMO), mc.prepare(shuffled)
    assert yaml.safe_dump(a) == yaml.safe_dump(b)


def test_inputs_follow_the_experiment():
    cfg = mc.prepare(DEMO)
    kd = mc.attack_inputs(cfg, "kd")
    assert kd["cache"] == "results/queries/soft/pool.pt" and "victim" not in kd
    marich = mc.attack_inputs(cfg, "marich")
    assert "cache" not in marich and marich["victim"] == "results/victims/clean/model.pt"
    control = mc.attack_inputs(cfg, "control-s3")
    assert control["watermark_logs"] == ["results/queries/defended/pool.watermark.pt"]
    assert control["verify_victim"] == "results/victims/watermarked/model.pt"
    assert mc.attack_inputs(cfg, "boundary-s3-random")["victim"] == (
        "results/victims/watermarked/model.pt")
