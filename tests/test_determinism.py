"""Determinism: the same config and seed on the CPU give identical results in a
second, separate run; only the wall-clock fields (mextract.runtime.TIMING_KEYS)
differ. The victim's side is covered by tests/test_resume.py (a killed and resumed
victim equals the session's demo victim bit for bit); here the query collection and
an experiment are run again and compared with the session's demo run."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import snakemake

from mextract.compute import Compute
from mextract.io import load_artifact, read_json
from mextract.runtime import TIMING_KEYS, seed_everything, without_timings
from mextract.train import TrainConfig, cross_entropy, train

CACHE = Path("results/queries/soft/pool.pt")
EXP = Path("results/experiments/kd/seed0")


def test_without_timings_drops_only_timing_keys() -> None:
    record = {"test_accuracy": 0.5, "wall_time_s": 3.2,
              "history": [{"epoch": 1, "train_time_s": 1.0}], "compute": {"device": "cpu"}}
    assert without_timings(record) == {"test_accuracy": 0.5, "history": [{"epoch": 1}],
                                       "compute": {"device": "cpu"}}
    assert {"wall_time_s", "train_time_s"} <= TIMING_KEYS


def _tiny_run(seed: int) -> tuple[dict[str, torch.Tensor], list[dict]]:
    gen = torch.Generator().manual_seed(123)
    x = torch.randint(0, 256, (96, 3, 32, 32), dtype=torch.uint8, generator=gen)
    y = torch.randint(0, 4, (96,), generator=gen)
    seed_everything(seed)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4),
                                torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Dropout(0.2), torch.nn.LazyLinear(4))
    model(torch.zeros(2, 3, 32, 32))
    history = train(model, x, {"y": y}, cross_entropy(0.1), TrainConfig(epochs=2, batch_size=16),
                    Compute(device="cpu", amp=False, channels_last=False), seed=seed,
                    desc="tiny")
    return model.state_dict(), history


def test_same_seed_same_weights_other_seed_other_weights() -> None:
    a, hist_a = _tiny_run(0)
    b, hist_b = _tiny_run(0)
    c, _ = _tiny_run(1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert without_timings(hist_a) == without_timings(hist_b)
    assert not all(torch.equal(a[k], c[k]) for k in a)  # the seed does matter


@pytest.mark.workflow
def test_second_run_of_queries_and_experiment_is_identical(demo_run: Path,
                                                           tmp_path: Path) -> None:
    work = tmp_path / "demo"
    shutil.copytree(demo_run, work, symlinks=True)
    shutil.rmtree(work / EXP)
    (work / CACHE).unlink()
    snakemake(work, str(EXP / "metrics.json"), "--cores", "1", "--configfile",
              "config/demo.yaml")

    first, second = load_artifact(demo_run / CACHE), load_artifact(work / CACHE)
    assert first.keys() == second.keys()
    for key, value in first.items():
        assert (torch.equal(value, second[key]) if isinstance(value, torch.Tensor)
                else value == second[key]), key

    weights, ref_weights = load_artifact(work / EXP / "model.pt"), load_artifact(
        demo_run / EXP / "model.pt")
    assert all(torch.equal(weights[k], ref_weights[k]) for k in ref_weights)
    metrics, ref_metrics = read_json(work / EXP / "metrics.json"), read_json(
        demo_run / EXP / "metrics.json")
    assert without_timings(metrics) == without_timings(ref_metrics)
    assert metrics.keys() == ref_metrics.keys()
    drop = sorted(TIMING_KEYS)
    pd.testing.assert_frame_equal(
        pd.read_csv(work / EXP / "history.csv").drop(columns=drop, errors="ignore"),
        pd.read_csv(demo_run / EXP / "history.csv").drop(columns=drop, errors="ignore"),
        check_exact=True)
