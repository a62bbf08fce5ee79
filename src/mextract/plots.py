"""Figures of a run (matplotlib, no display needed): per stage, fidelity against the
victim queries spent (every seed of every experiment) and accuracy / fidelity (means
over the seeds, ± one sd) beside the reference study's; the victims' training curves.

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


def _by_experiment(runs: Sequence[tuple[Mapping[str, Any], pd.DataFrame]]
                   ) -> dict[str, list[tuple[Mapping[str, Any], pd.DataFrame]]]:
    """The runs of each experiment (one per seed), experiments in order of first
    appearance."""
    out: dict[str, list[tuple[Mapping[str, Any], pd.DataFrame]]] = {}
    for m, hist in runs:
        out.setdefault(str(m.get("experiment")), []).append((m, hist))
    return out


def _colours(infos: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """One colour per experiment in order; a random baseline takes the colour of the
    adaptive experiment it is matched to, when that is drawn too."""
    partner = {name: m.get("baseline_of") for name, m in infos.items()
               if m.get("baseline_of") in infos and m.get("baseline_of") != name}
    colours: dict[str, Any] = {}
    for name in infos:
        if name not in partner:
            colours[name] = COLOURS[len(colours) % len(COLOURS)]
    for name, of in partner.items():
        colours[name] = colours.get(of, COLOURS[len(colours) % len(COLOURS)])
    return colours


def _seeds_label(n: int) -> str:
    return f", {n} seeds" if n > 1 else ""


def fidelity_vs_queries(runs: Sequence[tuple[Mapping[str, Any], pd.DataFrame]], stage: int,
                        paths: Sequence[str | Path]) -> Figure:
    """Fidelity against the victim queries spent, every experiment of one stage on one
    log-x axis.

    ``runs``: (metrics.json, history.csv) per run, several runs (substitute seeds) per
    experiment; each experiment has one colour and one legend entry. Adaptive
    strategies, whose per-epoch query count grows, are a thin line per seed through its
    evaluations with a dot at its final substitute. Strategies that train on one fixed
    set of answers (all epochs at the same count) are a vertical bar spanning the
    per-epoch fidelities of all seeds, a small dot per seed's final fidelity and a
    diamond at their mean; several at the same count are spread sideways a little. A
    random baseline (``baseline_of``) is drawn like the others in the colour of its
    adaptive experiment, dashed and with open markers. Experiments that spent no queries
    (the control) are horizontal reference lines at their mean final fidelity, with a
    band from the lowest to the highest seed where there are several.
    """
    fig = Figure(figsize=(7.5, 4.5), layout="constrained")
    ax = fig.add_subplot()
    xs: list[float] = []
    ys: list[float] = []
    fixed: dict[int, int] = {}  # query count -> how many fixed-count strategies drawn there
    groups = _by_experiment(runs)
    colours = _colours({name: seed_runs[0][0] for name, seed_runs in groups.items()})
    for exp, seed_runs in groups.items():
        first = seed_runs[0][0]
        n = len(seed_runs)
        name = f"{exp} ({first.get('strategy')})"
        colour = colours[exp]
        random = bool(first.get("baseline_of"))
        style = {"linestyle": "--" if random else "-",
                 "markerfacecolor": "none" if random else colour}
        finals_q = [float(m.get("queries") or 0) for m, _ in seed_runs]
        finals_f = [_final(m, h, "fidelity") for m, h in seed_runs]
        hists = [h.dropna(subset=["fidelity"]) if "fidelity" in h else h.iloc[:0]
                 for _, h in seed_runs]
        qs = [h["queries"].astype(float) if "queries" in h else pd.Series(fq, index=h.index)
              for h, fq in zip(hists, finals_q, strict=True)]
        finite_f = [f for f in finals_f if not math.isnan(f)]
        mean_f = float(np.mean(finite_f)) if finite_f else math.nan
        if all(fq <= 0 and (q <= 0).all() for fq, q in zip(finals_q, qs, strict=True)):
            ax.axhline(mean_f, **CONTROL_STYLE,
                       label=f"{name}: 0 queries, {100 * mean_f:.1f}%{_seeds_label(n)}")
            if len(finite_f) > 1:
                ax.axhspan(min(finite_f), max(finite_f), color=CONTROL_STYLE["color"],
                           alpha=0.12, linewidth=0)
            ys.append(mean_f)
            continue
        if any(q.nunique() > 1 for q in qs):  # adaptive: fidelity grows with the queries
            for k, (h, q, fq, ff) in enumerate(zip(hists, qs, finals_q, finals_f, strict=True)):
                keep = q > 0
                ax.plot(q[keep], h["fidelity"][keep], marker="o", ms=3, color=colour,
                        linewidth=1.0 if n > 1 else 1.5, alpha=0.75 if n > 1 else 1.0,
                        label=f"{name}{_seeds_label(n)}" if k == 0 else "_nolegend_",
                        **style)
                ax.plot([fq], [ff], marker="o", ms=7 if n == 1 else 5, color=colour,
                        linestyle="none", markerfacecolor=style["markerfacecolor"])
                xs += [*q[keep], fq]
                ys += [*h["fidelity"][keep], ff]
        else:
            final_q = float(np.mean(finals_q))
            k = fixed.get(round(final_q), 0)
            fixed[round(final_q)] = k + 1
            x = final_q * 1.06 ** (((k + 1) // 2) * (-1) ** k)  # 0, +1, -1, +2 ... steps
            epoch_f = [f for h in hists for f in h["fidelity"]]
            if epoch_f:
                ax.vlines(x, min(epoch_f), max(epoch_f), color=colour, alpha=0.5,
                          linewidth=2, linestyle=style["linestyle"])
            if n > 1:
                ax.plot([x] * len(finals_f), finals_f, marker="o", ms=3, color=colour,
                        linestyle="none", markerfacecolor=style["markerfacecolor"])
            epochs = max((len(h) for h in hists), default=0)
            ax.plot([x], [mean_f], marker="D", ms=7, color=colour, linestyle="none",
                    markerfacecolor=style["markerfacecolor"],
                    label=f"{name}: {epochs} epochs on {_queries(final_q)} answers"
                          f"{_seeds_label(n)}")
            xs.append(x)
            ys += [*finals_f, *epoch_f]
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


def _queries(q: float) -> str:
    return f"{int(q):,}" if float(q).is_integer() else f"{q:,.1f}"


def _column(table: pd.DataFrame, key: str) -> np.ndarray:
    if key not in table:
        return np.full(len(table), np.nan)
    return pd.to_numeric(table[key], errors="coerce").to_numpy(dtype=float, na_value=np.nan)


def accuracy_fidelity_bars(table: pd.DataFrame, stage: int,
                           paths: Sequence[str | Path]) -> Figure:
    """Test accuracy and fidelity of each attack of one stage, ours (solid, the mean over
    the seeds) next to the study's (hatched) where it reports one; WSR as well where
    measured. Where an experiment ran several seeds (``n`` > 1) an error bar shows ± one
    sample sd. The stage's control is drawn as horizontal reference lines (its mean
    accuracy and fidelity).

    ``table``: rows of :func:`mextract.report.results_table` for this stage (the study's
    numbers are its ``study_*`` columns, the sds its ``*_sd`` columns).
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
    n = _column(attacks, "n") if "n" in attacks else np.ones(len(attacks))
    drew_errors = False
    for j, (key, label) in enumerate(metrics):
        colour = COLOURS[j]
        ours = _column(attacks, key)
        study = _column(attacks, f"study_{key}")
        sd = _column(attacks, f"{key}_sd")
        offset = (2 * j - len(metrics) + 0.5) * width
        ax.bar(x + offset, np.nan_to_num(ours), width, color=colour, label=f"{label}, ours")
        spread = (n > 1) & np.isfinite(sd) & np.isfinite(ours)
        if spread.any():
            ax.errorbar(x[spread] + offset, ours[spread], yerr=sd[spread], fmt="none",
                        ecolor="0.15", elinewidth=1, capsize=2)
            drew_errors = True
        tops = np.nan_to_num(ours) + np.where(spread, sd, 0.0)  # labels above the error bars
        for xi, v, top in zip(x + offset, ours, tops, strict=True):
            ax.annotate(f"{100 * v:.1f}" if not math.isnan(v) else "–", (xi, top),
                        xytext=(0, 1), textcoords="offset points", ha="center", va="bottom",
                        fontsize="x-small")
        bars = ax.bar(x + offset + width, np.nan_to_num(study), width, color=colour, alpha=0.45,
                      hatch="//", edgecolor=colour, label=f"{label}, study")
        ax.bar_label(bars, labels=[f"{100 * v:.1f}" if not math.isnan(v) else "n/a"
                                   for v in study], fontsize="x-small", padding=1)
    for _, c in controls.iterrows():
        seeds = _seeds_label(int(c["n"])) if "n" in c and not pd.isna(c["n"]) else ""
        ax.axhline(c["fidelity"], **CONTROL_STYLE,
                   label=f"{c['experiment']} fidelity {100 * c['fidelity']:.1f}%{seeds}")
        ax.axhline(c["test_accuracy"], color=CONTROL_STYLE["color"], linestyle=":",
                   linewidth=1.2,
                   label=f"{c['experiment']} test acc. {100 * c['test_accuracy']:.1f}%{seeds}")
    if drew_errors:
        ax.plot([], [], color="0.15", linewidth=1, label="± 1 sd over the seeds")
    ticks = [f"{e}\n({s})" for e, s in zip(attacks["experiment"], attacks["strategy"],
                                           strict=True)]
    if "n" in attacks:
        ticks = [f"{t}\nn = {int(k)}" if not math.isnan(k) else t
                 for t, k in zip(ticks, n, strict=True)]
    ax.set_xticks(x, ticks)
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
