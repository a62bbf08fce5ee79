"""Shared fixtures. The demo workflow runs once per test session (in a temporary
copy of the project) and is shared by every test that inspects its results."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished demo workflow (config/demo.yaml) in a temporary project copy."""
    work = copy_project(tmp_path_factory.mktemp("demo"))
    snakemake(work, "--cores", "2", "--configfile", "config/demo.yaml")
    return work


@pytest.fixture(autouse=True)
def _torch_threads() -> None:
    torch.set_num_threads(2)
