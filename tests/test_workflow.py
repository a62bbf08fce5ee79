"""The demo workflow end to end, then incremental reruns."""

import re

import pandas as pd
import yaml
from conftest import snakemake


def scheduled_jobs(proc) -> dict[str, int]:
    """Job counts from a dry run's 'Job stats' table."""
    jobs = {}
    table = proc.stdout.split("Job stats:")[-1]
    for line in table.splitlines():
        m = re.match(r"^(\w+)\s+(\d+)$", line.strip())
        if m and m.group(1) != "total":
            jobs[m.group(1)] = int(m.group(2))
    return jobs


def test_demo_table_has_kd_and_basic_above_chance(demo_run):
    table = pd.read_csv(demo_run / "results" / "table.csv")
    assert (demo_run / "results" / "table.md").exists()
    rows = table.set_index("experiment")
    for exp in ("kd", "basic"):
        assert rows.loc[exp, "test_accuracy"] > 0.3, rows.loc[exp]  # 10 classes: chance 0.1
        assert rows.loc[exp, "fidelity"] > 0.3, rows.loc[exp]
        assert rows.loc[exp, "queries"] > 0


def test_nothing_to_do_after_a_run(demo_run):
    proc = snakemake(demo_run, "-n", "--configfile", "config/demo.yaml")
    assert "Nothing to be done" in proc.stdout + proc.stderr, proc.stdout[-2000:]


def test_changed_parameter_reruns_only_that_experiment(demo_run):
    cfg = yaml.safe_load((demo_run / "config" / "demo.yaml").read_text())
    cfg["experiments"]["kd"]["params"]["temperature"] = 4.0
    (demo_run / "changed.yaml").write_text(yaml.safe_dump(cfg))
    proc = snakemake(demo_run, "-n", "--configfile", "changed.yaml")
    jobs = scheduled_jobs(proc)
    assert jobs.get("run_attack") == 1, proc.stdout[-3000:]
    assert "wildcards: exp=kd" in proc.stdout
    assert set(jobs) <= {"run_attack", "plot_stage", "make_table", "summarize_run", "all"}, jobs


def test_changed_strategy_code_reruns_only_its_experiments(demo_run):
    module = demo_run / "src" / "mextract" / "attacks" / "kd.py"
    original = module.read_text()
    module.write_text(original + "\n_CHANGED = True\n")
    try:
        proc = snakemake(demo_run, "-n", "--configfile", "config/demo.yaml")
    finally:
        module.write_text(original)
    jobs = scheduled_jobs(proc)
    assert jobs.get("run_attack") == 1 and "wildcards: exp=kd" in proc.stdout, proc.stdout[-3000:]
    assert set(jobs) <= {"run_attack", "plot_stage", "make_table", "summarize_run", "all"}, jobs


def test_comment_in_library_code_reruns_nothing(demo_run):
    module = demo_run / "src" / "mextract" / "train.py"  # used by every training job
    original = module.read_text()
    module.write_text(original + "\n# a comment only\n")
    try:
        proc = snakemake(demo_run, "-n", "--configfile", "config/demo.yaml")
    finally:
        module.write_text(original)
    assert "Nothing to be done" in proc.stdout + proc.stderr, proc.stdout[-2000:]
