"""Kill and resume: a victim training killed with SIGKILL after its first epoch
checkpoint is rerun by Snakemake, continues from the checkpoint, and ends with the
same weights and metrics as an uninterrupted run (the session's demo run). Outputs
are atomic: the kill leaves no half-written file under an artifact's name."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from conftest import SNAKEMAKE, copy_project, snakemake

from mextract.io import (
    CorruptArtifactError,
    checksum_path,
    load_artifact,
    read_json,
    save_artifact,
)
from mextract.runtime import TIMING_KEYS, discard_stale_checkpoints, without_timings

VICTIM = Path("results/victims/clean")
TARGET = str(VICTIM / "metrics.json")
# The target comes first: --configfile takes every following word as a config file.
ARGS = [TARGET, "--cores", "2", "--configfile", "config/demo.yaml"]


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 600) -> None:
    t0 = time.monotonic()
    while not path.exists():
        if proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            raise AssertionError(f"snakemake ended (rc {proc.returncode}) before {path} "
                                 f"appeared:\n{out[-4000:]}")
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"{path} did not appear within {timeout} s")
        time.sleep(0.1)


@pytest.mark.workflow
def test_victim_training_resumes_after_sigkill(demo_run: Path, tmp_path: Path) -> None:
    work = copy_project(tmp_path)
    ckpt = work / VICTIM / "checkpoint.pt"
    proc = subprocess.Popen([*SNAKEMAKE, *ARGS], cwd=work, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        # The sidecar is written right after the checkpoint is renamed into place.
        wait_for(ckpt.with_name("checkpoint.pt.sha256"), proc)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # snakemake and its job: one process group
        proc.wait(timeout=60)
        if proc.stdout:
            proc.stdout.close()

    # Nothing half-written: no outputs yet, and the checkpoint is whole (a kill between
    # the checkpoint's rename and its sidecar's would show as a checksum mismatch).
    outputs = ["model.pt", "test_predictions.pt", "metrics.json", "history.csv"]
    assert not [f for f in outputs if (work / VICTIM / f).exists()]
    try:
        state = load_artifact(ckpt)
    except CorruptArtifactError:
        pytest.fail("the checkpoint of the killed run does not match its checksum")
    epochs = yaml.safe_load((work / "config" / "demo.yaml").read_text())["victims"]["clean"][
        "train"]["epochs"]
    assert 1 <= state["epoch"] < epochs, state["epoch"]
    killed_after = state["epoch"]

    # A killed Snakemake leaves its lock behind: unlock, as its error message says.
    # The rerun (rerun-incomplete comes from profiles/default) then resumes.
    snakemake(work, "--unlock", "--configfile", "config/demo.yaml")
    snakemake(work, *ARGS)
    log = (work / "results" / "logs" / "train_victim" / "clean.log").read_text()
    assert f"resumed from '{VICTIM / 'checkpoint.pt'}' after epoch {killed_after}" in log, log
    assert not ckpt.exists() and not ckpt.with_name("checkpoint.pt.sha256").exists()
    assert not list((work / "results").rglob(".*.tmp")), "temporary files left behind"

    # Same result as the uninterrupted run: weights bit for bit, metrics, history.
    resumed = load_artifact(work / VICTIM / "model.pt")
    reference = load_artifact(demo_run / VICTIM / "model.pt")
    assert resumed.keys() == reference.keys()
    different = [k for k in reference if not torch.equal(resumed[k], reference[k])]
    assert not different, f"weights differ from the uninterrupted run: {different[:5]}"
    assert torch.equal(load_artifact(work / VICTIM / "test_predictions.pt")["pred"],
                       load_artifact(demo_run / VICTIM / "test_predictions.pt")["pred"])
    metrics = read_json(work / VICTIM / "metrics.json")
    assert without_timings(metrics) == without_timings(read_json(demo_run / VICTIM /
                                                                 "metrics.json"))
    drop = [c for c in TIMING_KEYS]
    history = pd.read_csv(work / VICTIM / "history.csv").drop(columns=drop, errors="ignore")
    ref_history = pd.read_csv(demo_run / VICTIM / "history.csv").drop(columns=drop,
                                                                      errors="ignore")
    pd.testing.assert_frame_equal(history, ref_history, check_exact=True)


def test_kill_during_save_keeps_the_previous_artifact(tmp_path: Path) -> None:
    """A writer killed mid-write leaves the previous version intact and loadable."""
    path = tmp_path / "weights.pt"
    save_artifact({"w": torch.zeros(4)}, path)
    child = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, torch\n"
         "from mextract.io import save_artifact\n"
         "class Slow:\n"
         "    def __reduce__(self):\n"  # torch.save pickles this: stall mid-write
         "        sys.stdout.write('writing\\n'); sys.stdout.flush()\n"
         "        import time; time.sleep(60)\n"
         "        return (int, (0,))\n"
         f"save_artifact({{'w': torch.ones(1 << 20), 'slow': Slow()}}, {str(path)!r})\n"],
        stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None
    assert child.stdout.readline().strip() == "writing"
    child.kill()
    child.wait(timeout=30)
    child.stdout.close()
    assert torch.equal(load_artifact(path)["w"], torch.zeros(4))
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert leftovers, "expected the killed writer's temporary file"
    save_artifact({"w": torch.ones(4)}, path)  # the next write removes it
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert torch.equal(load_artifact(path)["w"], torch.ones(4))


def test_checkpoints_of_other_settings_are_discarded(tmp_path: Path) -> None:
    """A killed run's checkpoint is kept for a rerun with the same settings and
    deleted when the settings (params, code fingerprint) changed in between."""
    key = tmp_path / "checkpoint.key"
    settings = {"params": {"temperature": 3.0}, "code": "abc"}
    assert discard_stale_checkpoints(key, settings) == []  # first run: nothing there
    ckpt = tmp_path / "checkpoint-train.pt"
    save_artifact({"epoch": 1}, ckpt)
    assert discard_stale_checkpoints(key, settings) == []  # same settings: resume
    assert load_artifact(ckpt)["epoch"] == 1
    changed = {**settings, "params": {"temperature": 4.0}}
    assert discard_stale_checkpoints(key, changed) == [ckpt, checksum_path(ckpt)]
    assert not ckpt.exists() and key.exists()
    (tmp_path / "model.pt").write_bytes(b"kept")  # outputs are not checkpoints
    assert discard_stale_checkpoints(key, settings) == []
    assert (tmp_path / "model.pt").exists()
