"""Results tables built from the metrics files only."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from mextract.io import read_json

COLUMNS = ["stage", "experiment", "strategy", "api", "queries", "test_accuracy", "fidelity",
           "fidelity_on_victim_errors", "wall_time_s"]


def load_metrics(paths: Sequence[str | Path]) -> list[dict]:
    return [read_json(p) for p in paths]


def results_table(metrics: Sequence[dict]) -> pd.DataFrame:
    """One row per experiment, grouped by stage (stable within a stage)."""
    rows = [{c: m.get(c) for c in COLUMNS} for m in metrics]
    df = pd.DataFrame(rows, columns=COLUMNS)
    return df.sort_values("stage", kind="stable").reset_index(drop=True)


def to_markdown(df: pd.DataFrame, victims: Sequence[dict] = ()) -> str:
    """A GitHub-flavoured Markdown table (percentages with two decimals)."""
    shown = df.copy()
    for col in ("test_accuracy", "fidelity", "fidelity_on_victim_errors"):
        shown[col] = shown[col].map(lambda v: "-" if pd.isna(v) else f"{100 * v:.2f}%")
    shown["queries"] = shown["queries"].map(lambda v: f"{int(v):,}")
    shown["wall_time_s"] = shown["wall_time_s"].map(lambda v: f"{v:.1f}")
    lines = ["| " + " | ".join(shown.columns) + " |",
             "|" + "---|" * len(shown.columns)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |"
              for row in shown.itertuples(index=False)]
    head = []
    for v in victims:
        head.append(f"Victim `{v['victim']}` ({v['arch']}, width {v['width']}): test accuracy "
                    f"{100 * v['test_accuracy']:.2f}%, {v['train_time_s']:.0f} s training.")
    return "\n".join([*head, "", *lines, ""]) if head else "\n".join([*lines, ""])
