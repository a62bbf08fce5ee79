"""Corrupt inputs: a truncated, garbage or tampered weights file or query cache is
detected with an error naming the file, never silently used; tensors are only ever
loaded with ``torch.load(..., weights_only=True)``."""

from __future__ import annotations

import ast
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import ROOT, snakemake

from mextract.compute import Compute
from mextract.experiment import load_victim
from mextract.io import (
    CorruptArtifactError,
    checksum_path,
    load_artifact,
    read_json,
    save_artifact,
    sha256_file,
)
from mextract.models import build_model
from mextract.train import TrainConfig, cross_entropy, train

VICTIM_CFG = {"arch": "vgg11", "width": 0.125}


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def garbage(path: Path) -> None:
    path.write_bytes(b"\x00garbage, not a torch file\xff" * 64)


def flip_a_byte(path: Path) -> None:
    """A valid zip still (only tensor data changed): only the checksum can tell."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def garbage_sidecar(path: Path) -> None:
    checksum_path(path).write_text("not a checksum\n")


def no_sidecar(path: Path) -> None:
    checksum_path(path).unlink()


DAMAGE: dict[str, Callable[[Path], None]] = {
    "truncated": truncate, "garbage": garbage, "flipped_byte": flip_a_byte,
    "garbage_sidecar": garbage_sidecar, "no_sidecar": no_sidecar}


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A substitute-sized weights file and a soft-label query cache, written once."""
    root = tmp_path_factory.mktemp("pristine")
    files = {"weights": root / "victim" / "model.pt",
             "cache": root / "queries" / "soft" / "pool.pt"}
    save_artifact(build_model(VICTIM_CFG["arch"], 10, VICTIM_CFG["width"]).state_dict(),
                  files["weights"])
    save_artifact({"kind": "soft", "api": "soft", "query_set": "pool",
                   "indices": torch.arange(64), "answers": torch.rand(64, 10).softmax(1),
                   "count": 64}, files["cache"])
    return files


def _copy(src: Path, dest_dir: Path) -> Path:
    dest_dir.mkdir(parents=True)
    for f in (src, checksum_path(src)):
        shutil.copy2(f, dest_dir / f.name)
    return dest_dir / src.name


@pytest.fixture
def weights(pristine: dict[str, Path], tmp_path: Path) -> Path:
    return _copy(pristine["weights"], tmp_path / "victim")


@pytest.fixture
def query_cache(pristine: dict[str, Path], tmp_path: Path) -> Path:
    return _copy(pristine["cache"], tmp_path / "queries" / "soft")


def test_intact_files_load(weights: Path, query_cache: Path) -> None:
    assert isinstance(load_victim(weights, VICTIM_CFG, 10), torch.nn.Module)
    assert load_artifact(query_cache)["count"] == 64


def test_truncated_victim_weights_stop_the_victim_loader(weights: Path) -> None:
    truncate(weights)
    with pytest.raises(CorruptArtifactError) as err:
        load_victim(weights, VICTIM_CFG, 10)  # the loader the workflow's rules use
    assert str(weights) in str(err.value)


@pytest.mark.parametrize("damage", DAMAGE)
def test_damaged_weights_are_rejected_naming_the_file(weights: Path, damage: str) -> None:
    DAMAGE[damage](weights)
    with pytest.raises(CorruptArtifactError) as err:
        load_artifact(weights)
    assert str(weights) in str(err.value)


@pytest.mark.parametrize("damage", DAMAGE)
def test_damaged_query_cache_is_rejected_naming_the_file(query_cache: Path,
                                                         damage: str) -> None:
    DAMAGE[damage](query_cache)
    with pytest.raises(CorruptArtifactError) as err:
        load_artifact(query_cache)
    assert str(query_cache) in str(err.value)


def test_unverified_load_still_rejects_unparsable_files(weights: Path) -> None:
    truncate(weights)
    with pytest.raises(CorruptArtifactError, match="cannot be read") as err:
        load_artifact(weights, verify=False)
    assert str(weights) in str(err.value)


class _Payload:
    """Pickles to a call of ``Path.touch``: code that a plain torch.load would run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickled_code_is_refused_even_with_a_valid_checksum(tmp_path: Path) -> None:
    path, marker = tmp_path / "model.pt", tmp_path / "pwned"
    torch.save({"w": torch.ones(2), "x": _Payload(marker)}, path)
    checksum_path(path).write_text(f"{sha256_file(path)}  model.pt\n")
    with pytest.raises(CorruptArtifactError, match="weights_only"):
        load_artifact(path)
    assert not marker.exists(), "the pickled payload ran"


def test_garbage_json_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "metrics.json"
    path.write_text('{"test_accuracy": 0.9')  # cut short
    with pytest.raises(CorruptArtifactError, match="metrics.json"):
        read_json(path)


def test_corrupt_checkpoint_is_ignored_and_training_starts_over(tmp_path: Path) -> None:
    """A damaged checkpoint is never resumed from: training restarts from scratch and
    matches a run without any checkpoint."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8, generator=gen)
    y = torch.randint(0, 3, (64,), generator=gen)
    cfg = TrainConfig(epochs=2, batch_size=8, lr=0.05)
    compute = Compute(device="cpu", amp=False, channels_last=False)

    def run(checkpoint: Path | None) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 3))
        train(model, x, {"y": y}, cross_entropy(), cfg, compute, seed=0,
              checkpoint=checkpoint, desc="tiny")
        return model.state_dict()

    reference = run(None)
    ckpt = tmp_path / "checkpoint.pt"
    save_artifact({"epoch": 1}, ckpt)
    garbage(ckpt)
    resumed = run(ckpt)
    assert all(torch.equal(resumed[k], reference[k]) for k in reference)


def test_every_torch_load_is_weights_only() -> None:
    """Static check of the library and the workflow scripts."""
    offenders = []
    for path in [*ROOT.joinpath("src").rglob("*.py"), *ROOT.joinpath("workflow").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "load"
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"):
                kw = {k.arg: k.value for k in node.keywords}
                if not (isinstance(kw.get("weights_only"), ast.Constant)
                        and kw["weights_only"].value is True):
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not offenders, f"torch.load without weights_only=True: {offenders}"


@pytest.mark.workflow
def test_workflow_stops_on_a_corrupt_cache_and_weights(demo_run: Path, tmp_path: Path) -> None:
    """In a copy of the finished demo: a damaged query cache makes the experiment that
    reads it fail naming the file; so does a damaged victim for the query collection."""
    work = tmp_path / "demo"
    shutil.copytree(demo_run, work, symlinks=True)
    args = ["--cores", "1", "--configfile", "config/demo.yaml"]  # after the target

    cache = Path("results/queries/soft/pool.pt")
    truncate(work / cache)  # newer than the experiment's outputs: kd reruns
    proc = snakemake(work, "results/experiments/kd/seed0/metrics.json", *args, check=False)
    assert proc.returncode != 0, proc.stdout[-3000:]
    log = (work / "results/logs/run_attack/kd-seed0.log").read_text()
    assert f"'{cache}' does not match its recorded checksum" in log, log[-3000:]
    assert not (work / "results/experiments/kd/seed0/metrics.json").exists()

    victim = Path("results/victims/clean/model.pt")
    garbage(work / victim)  # newer than the query caches: their collection reruns
    proc = snakemake(work, "results/queries/hard/pool.pt", *args, check=False)
    assert proc.returncode != 0, proc.stdout[-3000:]
    log = (work / "results/logs/collect_queries/hard-pool.log").read_text()
    assert f"'{victim}' does not match its recorded checksum" in log, log[-3000:]
    assert not (work / "results/queries/hard/pool.pt").exists()
    # The damaged files are left for inspection, not replaced or used.
    assert json.loads((work / "results/victims/clean/metrics.json").read_text())
