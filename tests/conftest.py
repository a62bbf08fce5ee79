"""Shared fixtures. The demo workflow runs once per test session (in a temporary
copy of the project) and is shared by every test that inspects its results."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
SNAKEMAKE = [sys.executable, "-m", "snakemake"]
PROJECT_FILES = ["Snakefile", "rules", "workflow", "config", "src", "envs", "profiles", "report"]


def copy_project(dest: Path) -> Path:
    for name in PROJECT_FILES:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif src.exists():
            shutil.copy2(src, dest / name)
    return dest


def snakemake(workdir: Path, *args: str, check: bool = True,
              timeout: float = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([*SNAKEMAKE, *args], cwd=workdir, capture_output=True, text=True,
                          timeout=timeout, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{proc.stdout[-4000:]}\n"
                             f"{proc.stderr[-6000:]}")
    return proc


def files_outside_results(work: Path) -> dict[str, int]:
    """Every file of a project copy outside results/ and Snakemake's .snakemake/ (and
    Python's caches), with its modification time."""
    return {str(p.relative_to(work)): p.stat().st_mtime_ns for p in work.rglob("*")
            if p.is_file() and p.relative_to(work).parts[0] not in ("results", ".snakemake")
            and "__pycache__" not in p.parts}


#: the demo run's project copy outside results/, before and after its run
DEMO_FILES: dict[str, dict[str, int]] = {}


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished demo workflow (config/demo.yaml) in a temporary project copy."""
    work = copy_project(tmp_path_factory.mktemp("demo"))
    DEMO_FILES["before"] = files_outside_results(work)
    snakemake(work, "--cores", "2", "--configfile", "config/demo.yaml")
    DEMO_FILES["after"] = files_outside_results(work)
    return work


@pytest.fixture(autouse=True)
def _torch_threads() -> None:
    torch.set_num_threads(2)


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """One intra-op torch thread for the block: on the shared 2-core machine two threads
    made the small trainings of the unit tests 10-20x slower (measured: 1.5 s vs 13-33 s
    for one epoch in tests/test_stage2.py)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def single_thread() -> Iterator[None]:
    """:func:`one_thread` as a fixture (modules use it with ``usefixtures``)."""
    with one_thread():
        yield


class TinyVictim(nn.Module):
    """A small random conv net with spread-out logits (diverse labels and margins)."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.Tanh(),
                                 nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(128, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 8.0 * self.net(x)


def record_queries(api) -> list[torch.Tensor]:  # noqa: ANN001  (a VictimAPI)
    """Wrap ``api.query`` so that every batch the API is asked is appended (a copy) to
    the returned list."""
    asked: list[torch.Tensor] = []
    answer = api.query

    def recording(images: torch.Tensor) -> torch.Tensor:
        asked.append(images.clone())
        return answer(images)

    api.query = recording
    return asked
