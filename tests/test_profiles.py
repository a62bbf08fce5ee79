"""The execution profiles cover the workflow's rules: every rule that declares
``resources: gpu=GPU`` gets a GPU (and the GPU partition) in profiles/slurm, so a
cluster run never sends a GPU job to a CPU node by omission."""

import re

import yaml
from conftest import ROOT


def gpu_rules() -> set[str]:
    rules = set()
    for path in (ROOT / "rules").glob("*.smk"):
        for block in re.split(r"^rule ", path.read_text(), flags=re.M)[1:]:
            name = block.split(":", 1)[0].strip()
            if re.search(r"^\s+gpu=GPU,", block, flags=re.M):
                rules.add(name)
    return rules


def test_every_gpu_rule_gets_a_gpu_in_the_slurm_profile():
    found = gpu_rules()
    assert {"train_victim", "run_attack", "check_device"} <= found, found
    profile = yaml.safe_load((ROOT / "profiles" / "slurm" / "profile.yaml").read_text())
    resources = profile["set-resources"]
    missing = sorted(r for r in found if resources.get(r, {}).get("gpu") != 1)
    assert not missing, f"GPU rules without a GPU in profiles/slurm: {missing}"
    for rule in found:
        assert resources[rule]["slurm_partition"] == "gpu", rule
