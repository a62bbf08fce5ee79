"""Atomic, checksummed artifact files.

Every tensor artifact (data cache, split, weights, query cache, checkpoint) is written
to a temporary file in the same folder, flushed to disk and renamed into place, so a
killed job never leaves a half-written file under the artifact's name (a killed
write leaves at most a hidden ``.<name>.*.tmp`` file, removed by the next write of
that artifact). A ``<file>.sha256`` sidecar (``sha256sum`` format) records the
checksum; loading verifies it and raises :class:`CorruptArtifactError` naming the
file when the sidecar is missing or does not match, or when the file cannot be
parsed: a truncated, garbage or tampered file is never silently used. Tensors are
always loaded with ``torch.load(..., weights_only=True)``, which refuses pickled code.

JSON and text outputs (metrics, tables) are written atomically too
(:func:`write_json`, :func:`write_text`); :func:`read_json` names the file it cannot
parse.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

# torch is imported where a tensor is read or written: JSON and text outputs (every
# report job's) need none of it, and importing it costs ~2 s per job.


class CorruptArtifactError(RuntimeError):
    """An artifact on disk is truncated, garbage, has no checksum or does not match it."""


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def update_with_tensors(h: Any, *tensors: torch.Tensor) -> None:
    """Feed tensors' dtypes and bytes into a hashlib object (the digest of a pool, of
    cached answers or of a model's weights that a saved query log must match)."""
    import torch

    for t in tensors:
        t = t.detach().cpu().contiguous().reshape(-1)
        h.update(str(t.dtype).encode())
        h.update(t.view(torch.uint8).numpy().tobytes())


def tensor_digest(*tensors: torch.Tensor) -> str:
    """A short sha256 of tensors (:func:`update_with_tensors`), 16 hex digits."""
    h = hashlib.sha256()
    update_with_tensors(h, *tensors)
    return h.hexdigest()[:16]


def checksum_path(path: str | Path) -> Path:
    """The sidecar that records ``path``'s sha256: ``<path>.sha256``."""
    path = Path(path)
    return path.with_name(path.name + ".sha256")


def _fsync_dir(folder: Path) -> None:
    """Make a rename durable (best effort: not every file system allows it)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _atomic_write(path: Path, write: Callable[[IO[bytes]], Any]) -> None:
    """Write via a temporary file in the same folder, fsync, rename into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{path.name}."
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=prefix, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    # Temporary files of earlier writes of this artifact that were killed (SIGKILL
    # skips the cleanup above). Only one job writes a given artifact at a time.
    for stale in path.parent.glob(f"{glob.escape(prefix)}*.tmp"):
        if "." not in stale.name[len(prefix):-len(".tmp")]:  # not '.<name>.sha256.*'
            stale.unlink(missing_ok=True)


def save_artifact(obj: Any, path: str | Path) -> None:
    """``torch.save`` atomically and record the checksum beside the file.

    The file is renamed into place before its sidecar is: a kill between the two
    leaves a file whose checksum does not match, which :func:`load_artifact` reports
    (a checkpoint is then ignored; a workflow output belongs to an incomplete job,
    which Snakemake reruns).
    """
    import torch

    path = Path(path)
    _atomic_write(path, lambda f: torch.save(obj, f))
    _write_checksum(path, sha256_file(path))


def _write_checksum(path: Path, digest: str) -> None:
    """The ``sha256sum``-format sidecar of ``path`` (:func:`checksum_path`)."""
    _atomic_write(checksum_path(path), lambda f: f.write(f"{digest}  {path.name}\n".encode()))


def copy_artifact(src: str | Path, dst: str | Path) -> None:
    """Copy an artifact and its checksum sidecar (verified first), atomically."""
    src, dst = Path(src), Path(dst)
    digest = verify_artifact(src)
    data = src.read_bytes()
    _atomic_write(dst, lambda f: f.write(data))
    _write_checksum(dst, digest)


def verify_artifact(path: str | Path) -> str:
    """Check ``path`` against its sidecar; return the digest or raise
    :class:`CorruptArtifactError` (missing sidecar, mismatch) naming the file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"artifact not found: '{path}'")
    sidecar = checksum_path(path)
    if not sidecar.exists():
        raise CorruptArtifactError(
            f"'{path}' has no checksum file '{sidecar.name}' beside it, so it cannot be "
            "verified: it was not written by mextract.io.save_artifact, or its writer was "
            "killed. Delete it and rerun the rule that makes it (or copy the .sha256 file "
            "along with it).")
    fields = sidecar.read_text(errors="replace").split()
    expected = fields[0].lower() if fields else ""
    actual = sha256_file(path)
    if expected != actual:
        raise CorruptArtifactError(
            f"'{path}' does not match its recorded checksum ({sidecar.name}): the file "
            "is truncated or was changed after it was written. Delete it and rerun the "
            "rule that makes it.")
    return actual


def load_artifact(path: str | Path, map_location: str | torch.device = "cpu",
                  verify: bool = True) -> Any:
    """Load a file written by :func:`save_artifact`, verifying its checksum first.

    Always ``torch.load(..., weights_only=True)``: tensors, containers and plain
    values only, never pickled code. ``verify=False`` skips the checksum (for files
    from elsewhere); a file that cannot be parsed still raises
    :class:`CorruptArtifactError` naming it.
    """
    path = Path(path)
    if verify:
        verify_artifact(path)
    elif not path.exists():
        raise FileNotFoundError(f"artifact not found: '{path}'")
    import torch

    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - any parse failure means a bad file
        raise CorruptArtifactError(
            f"'{path}' cannot be read as a torch file of tensors (weights_only=True): "
            f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        ) from err


def write_json(obj: Any, path: str | Path) -> None:
    """Write JSON atomically (sorted keys, so equal content gives equal bytes)."""
    text = json.dumps(obj, indent=2, sort_keys=True) + "\n"
    _atomic_write(Path(path), lambda f: f.write(text.encode()))


def write_text(text: str, path: str | Path) -> None:
    """Write a text file (a CSV or Markdown table) atomically."""
    _atomic_write(Path(path), lambda f: f.write(text.encode()))


def rows_csv(rows: list[dict[str, Any]]) -> str:
    """Rows (a training history) as CSV text: one column per key, in the order keys
    first appear, empty where a row lacks one (as ``pandas.DataFrame(rows).to_csv``
    writes them, without importing pandas into every training job)."""
    import csv
    import io

    fields = list(dict.fromkeys(k for row in rows for k in row))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, restval="", lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: "" if v is None else v for k, v in row.items()} for row in rows)
    return buf.getvalue()


def read_json(path: str | Path) -> Any:
    """Read a JSON file; raise :class:`CorruptArtifactError` naming it when it is not
    valid JSON."""
    try:
        with open(path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CorruptArtifactError(f"'{path}' is not valid JSON ({err}): delete it and "
                                   "rerun the rule that makes it") from err
