"""Careless and hostile configs: names that would become paths outside results/, keys
given twice, and a fuzz test of random mutations of the demo config. Every mutation
either validates or fails in mextract.config (before any job) with a message naming a
config key; nothing else may escape (no KeyError, TypeError, ...)."""

from __future__ import annotations

import copy
import random
import time
from typing import Any

import pytest
import yaml
from conftest import ROOT

from mextract import config as mc

DEMO = yaml.safe_load((ROOT / "config" / "demo.yaml").read_text())


@pytest.mark.parametrize(("section", "old", "bad"), [
    ("victims", "clean", "../../x"),
    ("victims", "clean", ".."),
    ("apis", "soft", "../x"),
    ("apis", "hard", "a/b"),
    ("experiments", "kd", ".."),
    ("experiments", "kd", ".hidden"),
])
def test_names_that_become_paths_are_checked(section, old, bad):
    cfg = copy.deepcopy(DEMO)
    cfg[section] = {(bad if k == old else k): v for k, v in cfg[section].items()}
    with pytest.raises(mc.ConfigError, match=f"config key '{section}'"):
        mc.prepare(cfg)


@pytest.mark.parametrize("device", ["gpu", "cuda:x", "CUDA", "mps", ""])
def test_only_known_devices(device):
    with pytest.raises(mc.ConfigError, match="config key 'compute.device'"):
        mc.prepare({**copy.deepcopy(DEMO), "compute": {"device": device}})
    for ok in ("auto", "cpu", "cuda", "cuda:1"):
        assert mc.prepare({**copy.deepcopy(DEMO), "compute": {"device": ok}})


def test_a_cuda_device_this_machine_lacks_is_named(monkeypatch):
    monkeypatch.setenv("MEXTRACT_GPUS", "0")
    assert mc.device_problems("auto") == mc.device_problems("cpu") == []
    [problem] = mc.device_problems("cuda")
    assert problem.startswith("config key 'compute.device': 'cuda', but this machine "
                              "shows no NVIDIA GPU")
    monkeypatch.setenv("MEXTRACT_GPUS", "2")
    assert mc.device_problems("cuda") == mc.device_problems("cuda:1") == []
    assert "cuda:0 to cuda:1" in mc.device_problems("cuda:2")[0]
    monkeypatch.setenv("MEXTRACT_GPUS", "two")
    with pytest.raises(mc.ConfigError, match="MEXTRACT_GPUS: 'two'"):
        mc.visible_gpus()


def test_cuda_visible_devices_limits_the_gpus_seen(monkeypatch):
    monkeypatch.delenv("MEXTRACT_GPUS", raising=False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "-1")
    assert mc.visible_gpus() == 0
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert mc.visible_gpus() == 0


def test_a_watermark_target_outside_the_classes_is_refused(tmp_path):
    cfg = copy.deepcopy(DEMO)
    marked = next(n for n, v in cfg["victims"].items() if "watermark" in v)
    cfg["victims"][marked]["watermark"]["target"] = 10  # digits: classes 0-9
    with pytest.raises(mc.ConfigError, match=f"config key 'victims.{marked}.watermark"
                                             r".target': class 10 does not exist \(the "
                                             r"data set has 10 classes, 0-9\)"):
        mc.prepare(cfg)
    cfg["victims"][marked]["watermark"]["target"] = 9
    assert mc.prepare(cfg)
    for part in ("train", "test"):  # an image tree: its class folders
        for cls in ("cat", "dog", "cow"):
            (tmp_path / part / cls).mkdir(parents=True)
    cfg["dataset"] = {"name": "imagefolder", "root": str(tmp_path)}
    cfg["victims"][marked]["watermark"]["target"] = 3
    with pytest.raises(mc.ConfigError, match="has 3 classes, 0-2"):
        mc.prepare(cfg)


def test_names_that_differ_only_in_case_are_refused():
    cfg = copy.deepcopy(DEMO)
    cfg["experiments"]["KD"] = copy.deepcopy(cfg["experiments"]["kd"])
    with pytest.raises(mc.ConfigError, match="config key 'experiments.KD': differs from "
                                             "'experiments.kd' only in case"):
        mc.prepare(cfg)


def test_a_missing_pool_tree_is_refused_before_any_job(tmp_path):
    cfg = copy.deepcopy(DEMO)
    exp = next(n for n, e in cfg["experiments"].items() if e["strategy"] == "knockoff")
    cfg["experiments"][exp]["pool"] = {"source": "imagefolder", "root": str(tmp_path / "x")}
    with pytest.raises(mc.ConfigError, match=f"config key 'experiments.{exp}.pool.root'"):
        mc.prepare(cfg)
    (tmp_path / "x" / "cat").mkdir(parents=True)
    assert mc.prepare(cfg)


def test_a_root_the_data_set_would_ignore_is_refused():
    cfg = {**copy.deepcopy(DEMO), "dataset": {"name": "digits", "root": "/data/mine"}}
    with pytest.raises(mc.ConfigError, match="config key 'dataset.root': the digits"):
        mc.prepare(cfg)


def test_an_offline_cifar10_without_a_copy_is_refused(tmp_path):
    cfg = {**copy.deepcopy(DEMO), "dataset": {"name": "cifar10", "root": str(tmp_path),
                                              "download": False}}
    with pytest.raises(mc.ConfigError, match="config key 'dataset.root': .* holds no "
                                             "CIFAR-10 copy"):
        mc.prepare(cfg)
    (tmp_path / "cifar-10-batches-py").mkdir()
    assert mc.prepare(cfg)


def test_unused_victims_and_apis_are_named():
    cfg = copy.deepcopy(DEMO)
    assert mc.unused_entries(mc.prepare(cfg)) == []
    cfg["victims"]["spare"] = copy.deepcopy(cfg["victims"]["clean"])
    cfg["apis"]["typo"] = {**copy.deepcopy(cfg["apis"]["soft"]), "victim": "clean"}
    assert mc.unused_entries(mc.prepare(cfg)) == [
        "config key 'apis.typo': no experiment queries this API; it is left out",
        "config key 'victims.spare': no experiment or API uses this victim; it is not "
        "trained"]


@pytest.mark.parametrize(("exp", "params", "key"), [
    ("kd", {"temperature": 0}, "experiments.kd.params.temperature"),
    ("random_erasing", {"temperature": 0.0}, "experiments.random_erasing.params.temperature"),
    ("random_erasing", {"scale_min": 0.5, "scale_max": 0.1},
     "experiments.random_erasing.params.scale_min"),
])
def test_values_bound_to_fail_in_a_job_are_refused_before(exp, params, key):
    cfg = copy.deepcopy(DEMO)
    cfg["experiments"][exp]["params"] = params
    with pytest.raises(mc.ConfigError, match=f"config key '{key}'"):
        mc.prepare(cfg)


def test_an_image_folder_is_checked_before_any_job(tmp_path):
    def prepared(root):
        return mc.prepare({**copy.deepcopy(DEMO), "dataset": {"name": "imagefolder",
                                                               "root": str(root)}})

    with pytest.raises(mc.ConfigError, match="config key 'dataset.root'.*not a folder"):
        prepared(tmp_path / "nowhere")
    for cls in ("cat", "dog"):
        (tmp_path / "train" / cls).mkdir(parents=True)
    with pytest.raises(mc.ConfigError, match="no 'test/' folder"):
        prepared(tmp_path)
    (tmp_path / "test" / "cat").mkdir(parents=True)
    (tmp_path / "test" / "cow").mkdir()
    with pytest.raises(mc.ConfigError, match=r"only in train: \['dog'\], only in test: "
                                             r"\['cow'\]"):
        prepared(tmp_path)
    (tmp_path / "test" / "cow").rmdir()
    (tmp_path / "test" / "dog").mkdir()
    assert prepared(tmp_path)["dataset"]["root"] == str(tmp_path)


def test_a_key_given_twice_is_refused_with_its_lines(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("experiments:\n  kd: {stage: 1, strategy: control}\n"
                    "  kd: {stage: 2, strategy: control}\n")
    with pytest.raises(mc.ConfigError, match=r"line 3: config key 'kd' is given twice.*"
                                             r"first on line 2"):
        mc.read_yaml(path)
    with pytest.raises(mc.ConfigError, match="given twice"):
        mc.load(path)


# ------------------------------------------------------------------ fuzzing
ODD_NAMES = ["..", ".", "../x", "a/b", "", " ", "x" * 300, "ü", "-", "a b", "$HOME", "~"]
ODD_VALUES: list[Any] = [None, True, -1, 0, 1e12, -1e-9, 0.5, "x", "", [], {}, [1, 2],
                         {"a": 1}, float("nan"), 2**40]


def _paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix] if prefix else []
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _paths(v, (*prefix, i))
    return out


def _parent(cfg: Any, path: tuple) -> Any:
    for part in path[:-1]:
        cfg = cfg[part]
    return cfg


def mutate(cfg: dict, rng: random.Random) -> str:
    """Change one thing of ``cfg`` in place; returns what was done."""
    path = rng.choice(_paths(cfg))
    parent, key = _parent(cfg, path), path[-1]
    kind = rng.choice(["value", "value", "unknown key", "rename", "delete"])
    if kind == "value":
        parent[key] = copy.deepcopy(rng.choice(ODD_VALUES))
        return f"{path} = {parent[key]!r}"
    if kind == "unknown key" and isinstance(parent[key], dict):
        parent[key]["tpyo"] = 1
        return f"{path}.tpyo"
    if kind == "rename" and isinstance(parent, dict):
        new = rng.choice(ODD_NAMES)
        parent[new] = parent.pop(key)
        return f"{path} renamed {new!r}"
    if isinstance(parent, dict):
        del parent[key]
    else:
        parent.pop(key)
    return f"{path} deleted"


def test_fuzzed_configs_validate_or_name_a_key():
    rng = random.Random(20261201)
    start, n, failed = time.perf_counter(), 0, 0
    while n < 250:
        cfg = copy.deepcopy(DEMO)
        what = [mutate(cfg, rng) for _ in range(rng.choice([1, 1, 2]))]
        n += 1
        try:
            mc.prepare(cfg)
        except mc.ConfigError as err:
            failed += 1
            assert "config key '" in str(err), (what, str(err))
        except Exception as err:  # noqa: BLE001
            pytest.fail(f"mutation {what} raised {type(err).__name__}: {err}")
    assert time.perf_counter() - start < 60
    assert failed > n // 3  # most mutations are errors (else the fuzzing does nothing)


def test_a_job_names_the_device_key_when_cuda_fails():
    import torch

    from mextract.runtime import check_device

    assert check_device("cpu") == "cpu: cpu"
    if torch.cuda.is_available():
        pytest.skip("this machine's GPU works")
    with pytest.raises(RuntimeError, match="config key 'compute.device': 'cuda:0'"):
        check_device("cuda:0")


def test_every_strategy_parameter_is_read_by_its_code():
    """A parameter the config accepts (the registry's defaults) but the strategy's code
    never reads would be silently ignored: each name appears as a key in the code the
    strategy runs (its module's import closure)."""
    from mextract.attacks import registry
    from mextract.fingerprint import PACKAGE, closure, module_path

    for strategy in registry.STRATEGIES.values():
        code = "".join(module_path(m, PACKAGE).read_text()  # type: ignore[union-attr]
                       for m in closure([f"attacks/{strategy.source.stem}"]))
        unread = [k for k in strategy.defaults if f'"{k}"' not in code and f"'{k}'" not in code]
        assert not unread, f"{strategy.name}: parameters never read: {unread}"
