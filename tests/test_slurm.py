"""The demo workflow on a real (single-node, localhost) SLURM cluster with
profiles/slurm: every job goes through sbatch and the table equals the local run's.

Opt-in, because it installs Debian's SLURM packages and starts daemons: set
MEXTRACT_SLURM_E2E=1 (``.ci/run`` does) and run as root on a machine with apt-get.
The work is done by tests/slurm_e2e.sh, which can also be run by hand.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, copy_project

from mextract import config as mc

SCRIPT = ROOT / "tests" / "slurm_e2e.sh"
SKIPPED = 77  # the script's "cannot run here"
#: the script's whole output (job ids, rules, table, wall time) is kept here after a run
REPORT = Path(os.environ.get("MEXTRACT_SLURM_E2E_LOG", "/tmp/mextract-slurm-e2e.log"))


def skip_reason() -> str | None:
    if os.environ.get("MEXTRACT_SLURM_E2E") != "1":
        return ("opt-in: set MEXTRACT_SLURM_E2E=1 to run it (needs root and apt-get; it "
                "installs SLURM and starts slurmctld/slurmd/munged; .ci/run sets it)")
    if os.geteuid() != 0:
        return "needs root (it installs SLURM and starts its daemons)"
    if not shutil.which("apt-get") and not shutil.which("slurmctld"):
        return "needs apt-get to install SLURM (or SLURM installed)"
    if not shutil.which("timeout"):
        return "needs coreutils' timeout"
    return None


pytestmark = [pytest.mark.slurm, pytest.mark.workflow,
              pytest.mark.skipif(skip_reason() is not None, reason=skip_reason() or "")]


def test_demo_on_slurm_matches_local_run(demo_run: Path, tmp_path: Path) -> None:
    work = copy_project(tmp_path)
    env = {**os.environ, "PYTHON": sys.executable, "SLURM_E2E_WORKDIR": str(work),
           "REFERENCE_TABLE": str(demo_run / "results" / "table.csv"),
           "SLURM_E2E_TIMEOUT": "1800"}
    start = time.monotonic()
    proc = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True,
                          timeout=2400)
    out = proc.stdout + proc.stderr
    REPORT.write_text(out + f"\nslurm e2e wall time: {time.monotonic() - start:.0f} s "
                      f"(exit {proc.returncode})\n")
    if proc.returncode == SKIPPED:
        pytest.skip(out.strip().splitlines()[-1])
    assert proc.returncode == 0, out[-8000:]
    m = re.search(r"^SLURM jobs \((\d+)\): (.*)$", out, flags=re.M)
    assert m, out[-4000:]
    rules = [pair.split("=")[1] for pair in m.group(2).split(", ")]
    # The demo's DAG: every victim and every experiment is one SLURM job, and so are the
    # data rules and the query caches; the table and plot rules are local.
    # the part of the demo slurm_e2e.sh runs (it writes config/slurm-e2e.yaml)
    cfg = mc.prepare(yaml.safe_load((work / "config" / "slurm-e2e.yaml").read_text()))
    assert cfg["experiments"] and len(cfg["victims"]) == 2 and mc.stages(cfg) == [1, 2, 3]
    # an experiment that computes what an earlier one does copies its results
    # (reuse_attack, a local rule)
    twins = mc.twins(cfg)
    trained = [job for job in mc.experiment_jobs(cfg) if job[0] not in twins]
    assert rules.count("run_attack") == len(trained), rules
    assert rules.count("train_victim") == len(cfg["victims"]), rules
    assert rules.count("collect_queries") >= 1, rules
    assert {"prepare_data", "split_data"} <= set(rules), rules
    assert not {"make_table", "plot_stage", "plot_victims"} & set(rules), rules
    assert (work / "results" / "table.md").exists()
    print(out)  # the job ids and timings, in pytest -rA / -s output
