"""Atomic, checksummed artifact files.

Every tensor artifact (data cache, split, weights, query cache, checkpoint) is written
to a temporary file in the same folder and renamed into place, so a killed job never
leaves a half-written file. A ``<file>.sha256`` sidecar records the checksum; loading
verifies it and raises :class:`CorruptArtifactError` naming the file when it does not
match or the file cannot be parsed. Tensors are always loaded with
``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch


class CorruptArtifactError(RuntimeError):
    """An artifact on disk is truncated, garbage or does not match its checksum."""


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _checksum_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _atomic_write(path: Path, write: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_artifact(obj: Any, path: str | Path) -> None:
    """``torch.save`` atomically and record the checksum beside the file."""
    path = Path(path)
    _atomic_write(path, lambda f: torch.save(obj, f))
    digest = sha256_file(path)
    _atomic_write(_checksum_path(path), lambda f: f.write(f"{digest}  {path.name}\n".encode()))


def load_artifact(path: str | Path, map_location: str | torch.device = "cpu") -> Any:
    """Load a file written by :func:`save_artifact`, verifying its checksum."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"artifact not found: '{path}'")
    sidecar = _checksum_path(path)
    if sidecar.exists():
        expected = sidecar.read_text().split()[0] if sidecar.read_text().strip() else ""
        actual = sha256_file(path)
        if expected != actual:
            raise CorruptArtifactError(
                f"'{path}' does not match its recorded checksum ({sidecar.name}): the file "
                "is truncated or was changed after it was written. Delete it and rerun "
                "the rule that makes it."
            )
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - any parse failure means a bad file
        raise CorruptArtifactError(f"'{path}' cannot be read as a torch file: {err}") from err


def write_json(obj: Any, path: str | Path) -> None:
    """Write JSON atomically (sorted keys, so equal content gives equal bytes)."""
    text = json.dumps(obj, indent=2, sort_keys=True) + "\n"
    _atomic_write(Path(path), lambda f: f.write(text.encode()))


def read_json(path: str | Path) -> Any:
    with open(path) as f:
        return json.load(f)
