"""Defence-layer config entries as plain data (no torch: the workflow imports this).

An API's ``defences`` list (``config/schema.yaml``, ``$defs/defence``) holds two kinds
of layer:

* probability layers (:data:`PROB_TYPES`) map the victim's probability vectors to
  the served ones; they come first;
* label layers (:data:`LABEL_TYPES`: honey, dawn) map served hard labels to served
  labels; they come after every probability layer and only in a hard API.

Two probability layers hold a model of their own, trained by the defender before the
API answers anything: ``mad`` a *surrogate* of the attacker's model, and
``adaptive_misinformation`` a *misinformation* model. :func:`model_key` names each such
model by its kind and training spec (``$defs/defence_model``), so the workflow trains
one file per distinct model (:func:`required_models`) and the library looks each
layer's model up by the same key (:func:`mextract.defences.build_defences`).

Defaults live only in the schema: :func:`layer_defaults` and :func:`model_defaults`
read them from there (the layer classes take their argument defaults from these).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mextract import defaults

#: layers that act on probability vectors (soft or hard APIs), in no particular order
PROB_TYPES = ("topk", "rounding", "noise", "reverse_sigmoid", "mad",
              "adaptive_misinformation")
#: layers that act on hard labels (hard APIs only, after every probability layer)
LABEL_TYPES = ("honey", "dawn")
#: the model each model-holding layer type needs, by kind
MODEL_KINDS = {"mad": "surrogate", "adaptive_misinformation": "misinformation"}
_KEY_PREFIX = {"mad": "mad", "adaptive_misinformation": "am"}


def _defence_schema() -> dict[str, Any]:
    return defaults._schema()["$defs"]["defence"]


def layer_defaults(kind: str) -> dict[str, Any]:
    """``{key: default}`` of one defence type's keys in ``$defs/defence`` (the schema's
    ``if type == kind then ...`` block)."""
    for block in _defence_schema().get("allOf", []):
        if block["if"]["properties"]["type"].get("const") == kind:
            props = block["then"].get("properties", {})
            return {k: p["default"] for k, p in props.items() if "default" in p}
    raise ValueError(f"unknown defence type {kind!r}")


def model_defaults() -> dict[str, Any]:
    """``{key: default}`` of a defence model's training spec (``$defs/defence_model``)."""
    return defaults.of("defence_model")


def model_spec(layer_spec: Mapping[str, Any]) -> dict[str, Any] | None:
    """The full training spec of a layer's model (defaults filled in), or None for a
    layer without a model."""
    if layer_spec.get("type") not in MODEL_KINDS:
        return None
    return {**model_defaults(), **dict(layer_spec.get("model") or {})}


def model_key(layer_spec: Mapping[str, Any]) -> str | None:
    """A readable, deterministic id of the model a layer needs: its layer, kind and
    training spec, e.g. ``mad-surrogate-vgg11-w0.125-e5-lr0.05-b128`` (adaptive
    misinformation: ``am-misinformation-...``); None for a layer without a model.
    Two layers with the same key share one trained model."""
    spec = model_spec(layer_spec)
    if spec is None:
        return None
    kind = str(layer_spec["type"])
    parts = [_KEY_PREFIX[kind], MODEL_KINDS[kind], str(spec["arch"]),
             f"w{float(spec['width']):g}", f"e{int(spec['epochs'])}",
             f"lr{float(spec['lr']):g}", f"b{int(spec['batch_size'])}"]
    return "-".join(parts)


def required_models(defence_specs: list[dict] | None) -> dict[str, dict[str, Any]]:
    """The models a list of layer specs needs: ``{model_key: {"kind": "surrogate" |
    "misinformation", **training spec}}`` (each distinct model once, in list order)."""
    out: dict[str, dict[str, Any]] = {}
    for layer_spec in defence_specs or []:
        key = model_key(layer_spec)
        if key is not None and key not in out:
            spec = model_spec(layer_spec)
            assert spec is not None
            out[key] = {"kind": MODEL_KINDS[layer_spec["type"]], **spec}
    return out


def misplaced_prob_layer(types: list[str]) -> int | None:
    """Index of the first probability layer listed after a label layer (None when
    every probability layer precedes every label layer)."""
    seen_label = False
    for i, kind in enumerate(types):
        if kind in LABEL_TYPES:
            seen_label = True
        elif seen_label:
            return i
    return None
