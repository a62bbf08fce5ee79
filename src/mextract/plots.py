"""Figures of a run (matplotlib, no display needed): per stage, fidelity against the
victim queries spent and accuracy / fidelity beside the reference study's; the victims'
training curves.

Figures are built with :class:`matplotlib.figure.Figure` directly (no pyplot state, the
Agg canvas), and saved as PNG and SVG without timestamps so that equal inputs give
equal files.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib as mpl
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import PercentFormatter

from mextract.report import STAGE_TITLES, Reference

mpl.rcParams["svg.hashsalt"] = "mextract"  # stable SVG element ids

#: one colour per experiment, in table order (matplotlib's default cycle)
COLOURS = [c["color"] for c in mpl.rcParams["axes.prop_cycle"]]
CONTROL_STYLE = {"color": "0.35", "linestyle": "--", "linewidth": 1.2}


def save(fig: Figure, paths: Sequence[str | Path]) -> None:
    """Write ``fig`` to each path (format from the suffix: png, svg, pdf)."""
    for path in paths:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fmt = path.suffix.lstrip(".").lower()
        metadata = {"Date": None} if fmt in ("svg", "pdf") else {"Software": None}
        fig.savefig(path, format=fmt, dpi=150, bbox_inches="tight", metadata=metadata)


def _stage_title(stage: int) -> str:
    return f"Stage {stage}: {STAGE_TITLES.get(stage, '')}".rstrip(": ")


def _final(metrics: Mapping[str, Any], history: pd.DataFrame, key: str) -> float:
    value = metrics.get(key)
    if value is None and key in history and history[key].notna().any():
        value = history[key].dropna().iloc[-1]
    return math.nan if value is None else float(value)


def fidelity_vs_queries(runs: Sequence[tuple[Mapping[str, Any], pd.DataFrame]], stage: int,
                        paths: Sequence[str | Path]) -> Figure:
    """Fidelity against the victim queries spent, every experiment of one stage on one
    log-x axis.

    ``runs``: (metrics.json, history.csv) per experiment. Adaptive strategies, whose
    per-epoch query count grows, are a line through their evaluations. Strategies that
    train on one fixed set of answers (all epochs at the same count) are a vertical bar
    spanning their per-epoch fidelities with a marker at the final one; several at the
    same count are spread sideways a little. Experiments that spent no queries (the
    control) are horizontal reference lines at their final fidelity.
    """
    fig = Figure(figsize=(7.5, 4.5), layout="constrained")
    ax = fig.add_subplot()
    xs: list[float] = []
    ys: list[float] = []
    fixed: dict[int, int] = {}  # query count -> how many fixed-count strategies drawn there
    for i, (m, hist) in enumerate(runs):
        name = f"{m.get('experiment')} ({m.get('strategy')})"
        colour = COLOURS[i % len(COLOURS)]
        final_q = float(m.get("queries") or 0)
        final_f = _final(m, hist, "fidelity")
        h = hist.dropna(subset=["fidelity"]) if "fidelity" in hist else hist.iloc[:0]
        q = h["queries"].astype(float) if "queries" in h else pd.Series(final_q, index=h.index)
        if final_q <= 0 and (q <= 0).all():
            ax.axhline(final_f, **CONTROL_STYLE,
                       label=f"{name}: 0 queries, {100 * final_f:.1f}%")
            ys.append(final_f)
            continue
        if q.nunique() > 1:  # adaptive: fidelity grows with the queries spent
            keep = q > 0
            ax.plot(q[keep], h["fidelity"][keep], "o-", ms=3, color=colour, label=name)
            ax.plot([final_q], [final_f], "o", ms=7, color=colour)
            xs += [*q[keep], final_q]
            ys += [*h["fidelity"][keep], final_f]
        else:
            k = fixed.get(int(final_q), 0)
            fixed[int(final_q)] = k + 1
            x = final_q * 1.06 ** (((k + 1) // 2) * (-1) ** k)  # 0, +1, -1, +2 ... steps
            if len(h):
                ax.vlines(x, h["fidelity"].min(), h["fidelity"].max(), color=colour,
                          alpha=0.5, linewidth=2)
            ax.plot([x], [final_f], "D", ms=7, color=colour,
                    label=f"{name}: {len(h)} epochs on {int(final_q):,} answers")
            xs.append(x)
            ys += [final_f, *h["fidelity"]]
    ax.set_xscale("log")
    if xs:
        lo, hi = min(xs), max(xs)
        ax.set_xlim(lo / 2, hi * 2)
    else:
        ax.set_xlim(1, 10)
        ax.text(0.5, 0.5, "no experiment of this stage queried the victim",
                transform=ax.transAxes, ha="center", color="0.4")
    finite = [y for y in ys if not math.isnan(y)]
    if finite:
        ax.set_ylim(max(0.0, min(finite) - 0.05), min(1.0, max(finite) + 0.05))
    ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax.set_xlabel("victim queries spent (log scale)")
    ax.set_ylabel("fidelity (test-set agreement with the victim)")
    ax.set_title(f"{_stage_title(stage)}: fidelity against queries")
    ax.grid(True, which="both", alpha=0.3)
    if runs:
        ax.legend(fontsize="small", loc="best")
    save(fig, paths)
    return fig


def accuracy_fidelity_bars(table: pd.DataFrame, stage: int,
                           paths: Sequence[str | Path]) -> Figure:
    """Test accuracy and fidelity of each attack of one stage, ours (solid) next to the
    study's (hatched) where it reports one; WSR as well where measured. The stage's
    control is drawn as horizontal reference lines (its accuracy and fidelity).

    ``table``: rows of :func:`mextract.report.results_table` for this stage (the study's
    numbers are its ``study_*`` columns).
    """
    attacks = table[table["strategy"] != "control"].reset_index(drop=True)
    controls = table[table["strategy"] == "control"]
    metrics = [("test_accuracy", "test acc."), ("fidelity", "fidelity")]
    if "trigger_wsr" in table and table["trigger_wsr"].notna().any():
        metrics.append(("trigger_wsr", "WSR"))
    fig = Figure(figsize=(max(6.0, 1.6 * len(attacks) * len(metrics) / 2 + 2), 4.5),
                 layout="constrained")
    ax = fig.add_subplot()
    width = 0.8 / (2 * len(metrics))
    x = np.arange(len(attacks))
    for j, (key, label) in enumerate(metrics):
        colour = COLOURS[j]
        ours = pd.to_numeric(attacks[key], errors="coerce").to_numpy(dtype=float)
        study = pd.to_numeric(attacks[f"study_{key}"], errors="coerce").to_numpy(dtype=float) \
            if f"study_{key}" in attacks else np.full(len(attacks), np.nan)
        offset = (2 * j - len(metrics) + 0.5) * width
        bars = ax.bar(x + offset, np.nan_to_num(ours), width, color=colour, label=f"{label}, ours")
        ax.bar_label(bars, labels=[f"{100 * v:.1f}" if not math.isnan(v) else "–" for v in ours],
                     fontsize="x-small", padding=1)
        bars = ax.bar(x + offset + width, np.nan_to_num(study), width, color=colour, alpha=0.45,
                      hatch="//", edgecolor=colour, label=f"{label}, study")
        ax.bar_label(bars, labels=[f"{100 * v:.1f}" if not math.isnan(v) else "n/a"
                                   for v in study], fontsize="x-small", padding=1)
    for _, c in controls.iterrows():
        ax.axhline(c["fidelity"], **CONTROL_STYLE,
                   label=f"{c['experiment']} fidelity {100 * c['fidelity']:.1f}%")
        ax.axhline(c["test_accuracy"], color=CONTROL_STYLE["color"], linestyle=":",
                   linewidth=1.2,
                   label=f"{c['experiment']} test acc. {100 * c['test_accuracy']:.1f}%")
    ax.set_xticks(x, [f"{e}\n({s})" for e, s in zip(attacks["experiment"], attacks["strategy"],
                                                   strict=True)])
    if not len(attacks):
        ax.text(0.5, 0.5, "no attack experiment in this stage", transform=ax.transAxes,
                ha="center", color="0.4")
    ax.set_ylim(0, 1.12)
    ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax.set_title(f"{_stage_title(stage)}: ours beside the study's (values in %)")
    ax.legend(fontsize="x-small", ncols=2, loc="upper center", bbox_to_anchor=(0.5, -0.18))
    save(fig, paths)
    return fig


def victim_training(runs: Sequence[tuple[Mapping[str, Any], pd.DataFrame]],
                    paths: Sequence[str | Path], reference: Reference | None = None) -> Figure:
    """Each victim's test accuracy (left axis) and training loss (right axis) per epoch,
    with the study's reported victim accuracy as a reference line."""
    fig = Figure(figsize=(7.5, 4.5), layout="constrained")
    ax = fig.add_subplot()
    loss_ax = ax.twinx()
    for i, (m, hist) in enumerate(runs):
        colour = COLOURS[i % len(COLOURS)]
        name = f"{m.get('victim')} ({m.get('arch')}, width {m.get('width')})"
        acc = hist.dropna(subset=["test_accuracy"]) if "test_accuracy" in hist else hist.iloc[:0]
        ax.plot(acc["epoch"], acc["test_accuracy"], "o-", ms=3, color=colour,
                label=f"{name}: test acc., final {100 * float(m['test_accuracy']):.2f}%")
        if "loss" in hist:
            loss_ax.plot(hist["epoch"], hist["loss"], "--", color=colour, alpha=0.6,
                         label=f"{name}: training loss")
    ref = (reference or Reference()).get(0, "victim")
    if ref.get("test_accuracy") is not None:
        note = f", {ref['note']}" if ref.get("note") else ""
        ax.axhline(ref["test_accuracy"], **CONTROL_STYLE,
                   label=f"study: {100 * ref['test_accuracy']:.2f}% "
                         f"({(reference or Reference()).dataset}{note})")
    ax.set_ylim(0, 1.0)
    ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy")
    loss_ax.set_ylabel("training loss")
    loss_ax.set_ylim(bottom=0)
    ax.set_title("Stage 0: victim training")
    ax.grid(True, alpha=0.3)
    handles = ax.get_legend_handles_labels()
    loss_handles = loss_ax.get_legend_handles_labels()
    ax.legend(handles[0] + loss_handles[0], handles[1] + loss_handles[1], fontsize="small",
              loc="lower right")
    save(fig, paths)
    return fig
