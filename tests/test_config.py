"""Bad configurations stop the run before any job, naming the bad key."""

from pathlib import Path

import pytest
import yaml
from conftest import ROOT, copy_project, snakemake

BASE = yaml.safe_load((ROOT / "config" / "demo.yaml").read_text())


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    return copy_project(tmp_path_factory.mktemp("config"))


def dry_run(project: Path, cfg: dict, name: str):
    path = project / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return snakemake(project, "-n", "--configfile", path.name, check=False, timeout=120)


def edited(edit) -> dict:
    cfg = yaml.safe_load(yaml.safe_dump(BASE))
    edit(cfg)
    return cfg


CASES = {
    "unknown strategy": (
        lambda c: c["experiments"]["kd"].update(strategy="telepathy"),
        ["experiments.kd.strategy", "telepathy"],
    ),
    "negative budget": (
        lambda c: c["experiments"].update(
            cap={"stage": 1, "strategy": "kd", "api": "soft", "params": {"budget": -5}}),
        ["experiments.cap.params.budget"],
    ),
    "misspelt key": (
        lambda c: c["victims"]["clean"]["train"].update(epochz=3),
        ["victims.clean.train", "epochz"],
    ),
    "fraction outside (0, 1)": (
        lambda c: c["split"].update(victim_fraction=1.5),
        ["split.victim_fraction", "1.5"],
    ),
    "zero fraction": (
        lambda c: c["split"].update(victim_fraction=0),
        ["split.victim_fraction"],
    ),
    "unknown api": (
        lambda c: c["experiments"]["kd"].update(api="oracle"),
        ["experiments.kd.api", "oracle"],
    ),
    "soft strategy on hard api": (
        lambda c: c["experiments"]["kd"].update(api="hard"),
        ["experiments.kd.api", "soft"],
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_config_fails_fast_naming_the_key(project, case):
    edit, needles = CASES[case]
    proc = dry_run(project, edited(edit), case.replace(" ", "_").replace(",", ""))
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "invalid configuration" in out
    for needle in needles:
        assert needle in out, f"{needle!r} not named in:\n{out[-3000:]}"
    assert not (project / "results").exists()  # no job ran


def test_demo_config_is_valid(project):
    proc = dry_run(project, BASE, "demo_copy")
    assert proc.returncode == 0, proc.stderr[-3000:]
