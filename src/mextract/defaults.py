"""Defaults of the library's settings, read from ``config/schema.yaml``, their only home.

The workflow validates every config against that schema (:mod:`mextract.config`),
which fills in these same values; the library's own dataclasses
(:class:`mextract.train.TrainConfig`, :class:`mextract.compute.Compute`) take their
field defaults from here, so a default is written once, in the schema.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

import yaml

#: config/schema.yaml of this checkout
SCHEMA = Path(__file__).resolve().parents[2] / "config" / "schema.yaml"


@cache
def _schema() -> dict[str, Any]:
    """The parsed schema, once per process (libyaml's safe loader where PyYAML has it:
    every job reads the schema's defaults, and the pure-Python parser took 60 ms)."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    with open(SCHEMA) as f:
        return yaml.load(f, Loader=loader)  # noqa: S506  (a safe loader)


def of(section: str) -> dict[str, Any]:
    """``{key: default}`` of a schema object: a ``$defs`` entry (``"train"``) or a
    top-level property (``"compute"``)."""
    schema = _schema()
    node = schema["$defs"].get(section) or schema["properties"][section]
    return {key: prop["default"] for key, prop in node["properties"].items()
            if "default" in prop}
