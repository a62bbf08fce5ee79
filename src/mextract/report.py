"""Results tables built from the metrics files only, beside the reference study's numbers.

One row per experiment, grouped by stage. Every attack is compared with its stage's
``control`` experiment (true labels, zero queries): *fidelity gain* = fidelity minus
the control's fidelity, i.e. how much closer to the victim the stolen labels bring a
substitute than honest training on the same pool does. *Fidelity on victim errors*
(agreement on the test images the victim gets wrong) separates copying the victim from
merely being accurate (Jagielski et al., "High Accuracy and High Fidelity Extraction of
Neural Networks", USENIX Security 2020). The reference study's numbers come from one data
file, ``config/reference.yaml`` (see :func:`load_reference`).

The same display table (:func:`display_sections`) is written as Markdown, booktabs
LaTeX and HTML, so the three files agree cell for cell; ``table.csv`` holds the raw
numbers (fractions, counts, seconds). The module does not import torch, so the
workflow can read :data:`STAGE_TITLES` while it builds the DAG.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from mextract.attacks import registry  # torch-free, as is this module

#: stages of the study and their titles
STAGE_TITLES: dict[int, str] = {
    0: "victim",
    1: "soft-label extraction",
    2: "hard-label extraction",
    3: "extraction against a defended API",
}
#: the numbers a reference entry may give (fractions, except ``queries``; ``note`` is text)
REFERENCE_FIELDS = ("test_accuracy", "fidelity", "queries", "trigger_wsr", "note")
#: Stage-3 metrics keys, present only in those experiments' metrics.json
VERIFICATION_KEYS = ("trigger_wsr", "dawn_agreement", "dawn_p_value", "dawn_verified",
                     "api_honest_accuracy")
#: metrics compared with the study (ours minus the study's, in ``<key>_vs_study``)
COMPARED = ("test_accuracy", "fidelity", "queries", "trigger_wsr")

COLUMNS = ["stage", "experiment", "strategy", "api_name", "api", "victim", "queries",
           "test_accuracy", "fidelity", "fidelity_on_victim_errors", "control",
           "fidelity_gain", *VERIFICATION_KEYS, "wall_time_s",
           *[c for key in COMPARED for c in (f"study_{key}", f"{key}_vs_study")],
           "study_note"]
VICTIM_COLUMNS = ["victim", "arch", "width", "train_images", "watermark_fraction",
                  "test_accuracy", "trigger_wsr", "train_time_s",
                  "study_test_accuracy", "test_accuracy_vs_study", "study_note"]

DASH = "–"


class ReferenceError(ValueError):
    """The reference-numbers file names an unknown stage, strategy or field."""


@dataclass(frozen=True)
class Reference:
    """The study's numbers: ``stages[stage][strategy][field]``; ``dataset`` they are for."""

    stages: dict[int, dict[str, dict[str, Any]]] = field(default_factory=dict)
    dataset: str = "cifar10"
    source: str = ""

    def get(self, stage: int, strategy: str | None) -> dict[str, Any]:
        return dict(self.stages.get(int(stage), {}).get(strategy or "", {}))


# ------------------------------------------------------------------ inputs
def load_metrics(paths: Sequence[str | Path]) -> list[dict]:
    """The metrics.json files, in the given order."""
    out = []
    for p in paths:
        with open(p) as f:
            out.append(json.load(f))
    return out


def validate_reference(raw: Any, source: str = "reference") -> Reference:
    """Check a parsed reference file and return it as a :class:`Reference`.

    Stages must be 0-3; Stage 0 holds only ``victim``, Stages 1-3 registry strategy
    names; entries only :data:`REFERENCE_FIELDS`. Raises :class:`ReferenceError` listing
    every bad key by its path (e.g. ``stages.2.bogus``).
    """
    if not isinstance(raw, Mapping) or not isinstance(raw.get("stages"), Mapping):
        raise ReferenceError(f"{source}: expected a mapping with a 'stages' key")
    problems = [f"'{key}': unknown top-level key (known: source, dataset, stages)"
                for key in raw if key not in ("source", "dataset", "stages")]
    out: dict[int, dict[str, dict]] = {}
    for stage_key, entries in raw["stages"].items():
        where = f"stages.{stage_key}"
        try:
            stage = int(stage_key)
            if isinstance(stage_key, bool) or str(stage) != str(stage_key).strip():
                raise ValueError
        except (TypeError, ValueError):
            stage = -1
        if stage not in STAGE_TITLES:
            problems.append(f"'{where}': unknown stage {stage_key!r} (stages are 0-3)")
            continue
        if not isinstance(entries, Mapping):
            problems.append(f"'{where}': expected a mapping of strategy -> numbers")
            continue
        known = {"victim"} if stage == 0 else set(registry.STRATEGIES)
        out[stage] = {}
        for name, numbers in entries.items():
            key = f"{where}.{name}"
            if name not in known:
                problems.append(f"'{key}': unknown strategy {name!r} for stage {stage} "
                                f"(known: {', '.join(sorted(known))})")
                continue
            if not isinstance(numbers, Mapping):
                problems.append(f"'{key}': expected a mapping of numbers")
                continue
            for metric, value in numbers.items():
                if metric not in REFERENCE_FIELDS:
                    problems.append(f"'{key}.{metric}': unknown field "
                                    f"(known: {', '.join(REFERENCE_FIELDS)})")
                elif metric == "note":
                    if not isinstance(value, str):
                        problems.append(f"'{key}.note': must be text")
                elif value is not None and (isinstance(value, bool)
                                            or not isinstance(value, (int, float))):
                    problems.append(f"'{key}.{metric}': must be a number, got {value!r}")
                elif metric != "queries" and value is not None and not 0 <= value <= 1:
                    problems.append(f"'{key}.{metric}': {value!r} is not a fraction in [0, 1]")
            out[stage][name] = dict(numbers)
    if problems:
        raise ReferenceError(f"invalid reference file {source}:\n  " + "\n  ".join(problems))
    return Reference(out, str(raw.get("dataset", "cifar10")), str(raw.get("source", source)))


def load_reference(path: str | Path) -> Reference:
    """Read and validate ``config/reference.yaml`` (see :func:`validate_reference`)."""
    with open(path) as f:
        return validate_reference(yaml.safe_load(f), source=str(path))


# ------------------------------------------------------------------ tables (raw numbers)
def _num(value: Any) -> float:
    """A float, NaN for missing values (None, absent)."""
    if value is None or isinstance(value, str):
        return math.nan
    return float(value)


def _control_for(m: Mapping[str, Any], controls: Sequence[Mapping[str, Any]]) -> dict | None:
    """The control experiment an attack is compared with: the first control of the same
    stage and victim, else the stage's only control, else none."""
    same_stage = [c for c in controls if c.get("stage") == m.get("stage")]
    same_victim = [c for c in same_stage if c.get("victim") == m.get("victim")]
    if same_victim:
        return dict(same_victim[0])
    return dict(same_stage[0]) if len(same_stage) == 1 else None


def results_table(metrics: Sequence[Mapping[str, Any]],
                  reference: Reference | None = None) -> pd.DataFrame:
    """One row per experiment, columns :data:`COLUMNS`; by stage, each stage's control
    first, otherwise in the given order.

    ``fidelity_gain`` is the experiment's fidelity minus its stage's control's (NaN for
    the control itself and where the stage has none); ``study_<key>`` the reference
    number for the experiment's (stage, strategy) and ``<key>_vs_study`` ours minus it.
    """
    reference = reference or Reference()
    controls = [m for m in metrics if m.get("strategy") == "control"]
    rows = []
    for m in metrics:
        row: dict[str, Any] = {c: m.get(c) for c in COLUMNS}
        control = None if m.get("strategy") == "control" else _control_for(m, controls)
        row["control"] = control["experiment"] if control else None
        row["fidelity_gain"] = (_num(m.get("fidelity")) - _num(control.get("fidelity"))
                                if control else math.nan)
        ref = reference.get(int(m["stage"]), m.get("strategy"))
        for key in COMPARED:
            row[f"study_{key}"] = _num(ref.get(key))
            row[f"{key}_vs_study"] = _num(m.get(key)) - row[f"study_{key}"]
        row["study_note"] = ref.get("note")
        rows.append(row)
    df = pd.DataFrame(rows, columns=COLUMNS)
    for col in ("queries", "study_queries", "queries_vs_study"):
        df[col] = df[col].astype("Float64").round().astype("Int64")
    df["dawn_verified"] = df["dawn_verified"].astype("boolean")
    order = df["strategy"].ne("control")  # each stage's control first, then config order
    return (df.assign(_order=order).sort_values(["stage", "_order"], kind="stable")
            .drop(columns="_order").reset_index(drop=True))


def victims_table(victims: Sequence[Mapping[str, Any]],
                  reference: Reference | None = None) -> pd.DataFrame:
    """One row per victim with the study's Stage-0 accuracy beside it."""
    ref = (reference or Reference()).get(0, "victim")
    rows = []
    for v in victims:
        row = {c: v.get(c) for c in VICTIM_COLUMNS}
        row["watermark_fraction"] = (v.get("watermark") or {}).get("fraction")
        row["study_test_accuracy"] = _num(ref.get("test_accuracy"))
        row["test_accuracy_vs_study"] = _num(v.get("test_accuracy")) - row["study_test_accuracy"]
        row["study_note"] = ref.get("note")
        rows.append(row)
    return pd.DataFrame(rows, columns=VICTIM_COLUMNS)


# ------------------------------------------------------------------ display (formatted text)
def _missing(v: Any) -> bool:
    return v is None or v is pd.NA or (isinstance(v, float) and math.isnan(v))


def pct(v: Any) -> str:
    return DASH if _missing(v) else f"{100 * float(v):.2f}%"


def pp(v: Any) -> str:
    """A difference of fractions in percentage points."""
    return DASH if _missing(v) else f"{100 * float(v):+.2f} pp"


def count(v: Any, sign: bool = False) -> str:
    return DASH if _missing(v) else (f"{int(v):+,}" if sign else f"{int(v):,}")


def _text(v: Any) -> str:
    return DASH if _missing(v) or v == "" else str(v)


def _api(row: Mapping[str, Any]) -> str:
    api, name = row.get("api"), row.get("api_name")
    if _missing(name) or name in ("", api):
        return _text(api)
    return f"{name}: {_text(api)}"


def seconds(v: Any) -> str:
    return DASH if _missing(v) else f"{float(v):.1f}"


#: (header, formatter) of each displayed column; the ``OPTIONAL`` ones are left out of a
#: stage whose experiments all lack them
DISPLAY: dict[str, tuple[str, Any]] = {
    "experiment": ("experiment", _text),
    "strategy": ("strategy", _text),
    "api": ("API", None),  # from api_name and api
    "queries": ("queries", count),
    "test_accuracy": ("test acc.", pct),
    "fidelity": ("fidelity", pct),
    "fidelity_on_victim_errors": ("fid. on victim errors", pct),
    "fidelity_gain": ("fid. gain over control", pp),
    "trigger_wsr": ("WSR", pct),
    "dawn_agreement": ("DAWN agreement", pct),
    "dawn_p_value": ("DAWN p", lambda v: DASH if _missing(v) else f"{float(v):.3g}"),
    "dawn_verified": ("verified", lambda v: DASH if _missing(v) else ("yes" if v else "no")),
    "api_honest_accuracy": ("API honest acc.", pct),
    "wall_time_s": ("wall time (s)", seconds),
    "study_test_accuracy": ("study acc.", pct),
    "test_accuracy_vs_study": ("Δ acc.", pp),
    "study_fidelity": ("study fid.", pct),
    "fidelity_vs_study": ("Δ fid.", pp),
    "study_queries": ("study queries", count),
    "queries_vs_study": ("Δ queries", lambda v: count(v, sign=True)),
    "study_trigger_wsr": ("study WSR", pct),
    "trigger_wsr_vs_study": ("Δ WSR", pp),
    "study_note": ("study note", _text),
}
OPTIONAL = {*VERIFICATION_KEYS, "study_trigger_wsr", "trigger_wsr_vs_study", "study_note"}

#: the Stage-0 table: victim columns, then those it shares with :data:`DISPLAY`
VICTIM_DISPLAY: dict[str, tuple[str, Any]] = {
    "victim": ("victim", _text),
    "arch": ("arch", _text),
    "width": ("width", _text),
    "train_images": ("train images", count),
    "watermark_fraction": ("trigger copies", pct),
    **{k: DISPLAY[k] for k in ("test_accuracy", "trigger_wsr")},
    "train_time_s": ("training (s)", seconds),
    **{k: DISPLAY[k] for k in ("study_test_accuracy", "test_accuracy_vs_study", "study_note")},
}


def _format(df: pd.DataFrame, spec: Mapping[str, tuple[str, Any]],
            drop_empty: set[str] = frozenset()) -> pd.DataFrame:
    out = {}
    for col, (header, fmt) in spec.items():
        if col in drop_empty and all(_missing(v) for v in df[col]):
            continue
        if col == "api":
            out[header] = [_api(r) for r in df.to_dict("records")]
        else:
            out[header] = [fmt(v) for v in df[col]]
    return pd.DataFrame(out, columns=list(out))


def display_sections(df: pd.DataFrame) -> list[tuple[int, str, pd.DataFrame]]:
    """Per stage: (stage, heading, table of display strings). Stage-3 columns appear only
    in stages whose experiments have them."""
    sections = []
    for stage, part in df.groupby("stage", sort=True):
        stage = int(stage)
        title = f"Stage {stage}: {STAGE_TITLES.get(stage, '')}".rstrip(": ")
        sections.append((stage, title, _format(part, DISPLAY, OPTIONAL)))
    return sections


def display_victims(victims: pd.DataFrame) -> pd.DataFrame:
    return _format(victims, VICTIM_DISPLAY, {"study_note", "watermark_fraction", "trigger_wsr"})


# ------------------------------------------------------------------ writers
def _md_cell(s: str) -> str:
    return s.replace("|", "\\|")


def markdown_table(table: pd.DataFrame) -> list[str]:
    lines = ["| " + " | ".join(map(_md_cell, table.columns)) + " |",
             "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(_md_cell(str(v)) for v in row) + " |"
              for row in table.itertuples(index=False)]
    return lines


def to_markdown(df: pd.DataFrame, victims: pd.DataFrame | None = None,
                notes: Sequence[str] = ()) -> str:
    """GitHub-flavoured Markdown: notes, the victims, then one table per stage."""
    parts: list[str] = [*notes, ""] if notes else []
    if victims is not None and len(victims):
        parts += ["### Stage 0: victim", "", *markdown_table(display_victims(victims)), ""]
    for _, title, table in display_sections(df):
        parts += [f"### {title}", "", *markdown_table(table), ""]
    return "\n".join(parts)


#: characters of the display tables that (pdf)LaTeX does not take literally
LATEX_SYMBOLS = {"Δ": r"$\Delta$", DASH: "--"}


def _latex_table(table: pd.DataFrame, caption: str, label: str) -> str:
    styler = table.style.hide(axis="index").format(escape="latex")
    styler = styler.format_index(escape="latex", axis="columns")
    text = styler.to_latex(hrules=True, caption=caption, label=label,
                           column_format="l" * len(table.columns), position="htbp")
    for symbol, latex in LATEX_SYMBOLS.items():
        text = text.replace(symbol, latex)
    return text


def to_latex(df: pd.DataFrame, victims: pd.DataFrame | None = None,
             notes: Sequence[str] = ()) -> str:
    """booktabs LaTeX (``\\usepackage{booktabs}``): one ``table`` per stage."""
    parts = ["% Generated by mextract.report from the metrics files; needs \\usepackage{booktabs}"]
    parts += [f"% {n}" for n in notes]
    if victims is not None and len(victims):
        parts.append(_latex_table(display_victims(victims), "Stage 0: victim", "tab:stage0"))
    for stage, title, table in display_sections(df):
        parts.append(_latex_table(table, title, f"tab:stage{stage}"))
    return "\n".join(parts)


_CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
table.results { border-collapse: collapse; margin-bottom: 2em; font-size: 0.85em; }
table.results th, table.results td { padding: 0.25em 0.5em; border-bottom: 1px solid #ccc;
  text-align: right; white-space: nowrap; }
table.results th { border-bottom: 2px solid #444; white-space: normal; max-width: 7em;
  vertical-align: bottom; }
table.results td:nth-child(-n+3), table.results th:nth-child(-n+3) { text-align: left; }
p.note { color: #555; max-width: 60em; }
"""


def to_html(df: pd.DataFrame, victims: pd.DataFrame | None = None,
            notes: Sequence[str] = (), title: str = "Results") -> str:
    """A standalone HTML page with the same tables (for the Snakemake report)."""
    body = [f"<h1>{html.escape(title)}</h1>"]
    body += [f'<p class="note">{html.escape(n)}</p>' for n in notes]
    sections = [("Stage 0: victim", display_victims(victims))] if (
        victims is not None and len(victims)) else []
    sections += [(t, table) for _, t, table in display_sections(df)]
    for heading, table in sections:
        body.append(f"<h2>{html.escape(heading)}</h2>")
        body.append(table.to_html(index=False, escape=True, classes="results", border=0))
    return ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{_CSS}</style></head>\n<body>\n"
            + "\n".join(body) + "\n</body></html>\n")


def table_notes(dataset: str, title: str | None = None,
                reference: Reference | None = None) -> list[str]:
    """The sentences printed above the tables: what was run and what the study's columns
    are."""
    ref_data = (reference or Reference()).dataset
    notes = [f"Run: {title or 'mextract'}; data set: {dataset}. Percentages are of the test "
             "set; fidelity = agreement with the victim's test predictions; fid. gain = "
             "fidelity minus the stage's control (true labels, zero queries); Δ = ours minus "
             "the study's, in percentage points (queries: in queries)."]
    if dataset != ref_data:
        notes.append(f"The study's columns are its {ref_data} numbers "
                     "(../shared/reference/study.md); this run uses another data set, so "
                     "the differences are not a reproduction check.")
    return notes
