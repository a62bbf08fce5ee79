"""The defence matrix of a run: every defence stack against every listed attack, with
what each defence costs honest users and what PRADA detects (docs/defences.md).

Built from files only (rule ``make_matrix``): the metrics of every cell's jobs (one
per seed; :func:`mextract.config.matrix_cells` says which experiment is which cell),
the stage controls' metrics, and the honest-user side (``results/matrix/costs.json``:
per API, the accuracy of its answers on the test set, the share of labels its defences
changed, the mean L1 distortion of soft answers, and PRADA's false-positive rate on
simulated honest clients).

Outputs: ``matrix.csv`` (one row per cell, means and sds over the seeds), a heatmap
of fidelity gain over control per (defence, attack), the utility-protection plot
(honest-user accuracy and, for soft answers, mean L1 distortion against the best
attacker's fidelity, the standard plot of the MAD and adaptive-misinformation papers),
the detection table (queries until PRADA flags each attack, and its benign FPR), and
``protection per point``: how much a defence lowers the best attacker's fidelity per
percentage point of honest accuracy it costs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from mextract.plots import save


def _mean_sd(values: Sequence[float]) -> tuple[float, float]:
    vals = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not vals:
        return math.nan, math.nan
    return float(np.mean(vals)), (float(np.std(vals, ddof=1)) if len(vals) > 1 else math.nan)


def matrix_table(cells: Sequence[Mapping[str, Any]], metrics: Sequence[Mapping[str, Any]],
                 costs: Mapping[str, Mapping[str, Any]]) -> pd.DataFrame:
    """One row per cell: defence, attack, answers, experiment, API, n seeds, fidelity
    and accuracy (mean, sd), queries, fidelity gain over the stage's control (pp), the
    fidelity drop against the undefended cell of the same attack (pp, where the matrix
    has one), and the API's honest-user cost."""
    by_exp: dict[str, list[Mapping[str, Any]]] = {}
    for m in metrics:
        by_exp.setdefault(str(m["experiment"]), []).append(m)
    controls = {int(m["stage"]): m for m in metrics if m.get("strategy") == "control"}
    control_fid: dict[int, float] = {}
    for stage in controls:
        control_fid[stage] = _mean_sd([m["fidelity"] for m in metrics
                                       if m.get("strategy") == "control"
                                       and int(m["stage"]) == stage])[0]
    rows = []
    for c in cells:
        runs = by_exp.get(c["experiment"], [])
        fid, fid_sd = _mean_sd([r["fidelity"] for r in runs])
        acc, acc_sd = _mean_sd([r["test_accuracy"] for r in runs])
        cost = costs.get(c["api"], {})
        rows.append({
            "defence": c["defence"], "attack": c["attack"], "answers": c["answers"],
            "experiment": c["experiment"], "api": c["api"], "n": len(runs),
            "fidelity": fid, "fidelity_sd": fid_sd, "accuracy": acc, "accuracy_sd": acc_sd,
            "queries": _mean_sd([r["queries"] for r in runs])[0],
            "gain_over_control_pp": 100 * (fid - control_fid.get(int(c["stage"]), math.nan)),
            "honest_accuracy": cost.get("api_honest_accuracy", math.nan),
            "victim_accuracy": cost.get("api_victim_accuracy", math.nan),
            "changed_answers": cost.get("api_changed_answers", math.nan),
            "l1_distortion": cost.get("api_l1_distortion", math.nan),
        })
    df = pd.DataFrame(rows)
    if df.empty:
        return df
    none = {r["attack"]: r["fidelity"] for r in rows if not _defended(costs, r["api"])}
    df["fidelity_drop_pp"] = [100 * (none.get(a, math.nan) - f)
                              for a, f in zip(df["attack"], df["fidelity"], strict=True)]
    return df


def _defended(costs: Mapping[str, Mapping[str, Any]], api: str) -> bool:
    return bool(costs.get(api, {}).get("defences"))


def defence_summary(table: pd.DataFrame, costs: Mapping[str, Mapping[str, Any]]
                    ) -> pd.DataFrame:
    """Per defence and answer kind: the best attacker's fidelity, the honest-user cost
    and the protection per point of honest accuracy lost (the best attacker's fidelity
    drop against no defence, in pp, divided by the honest accuracy lost, in pp; inf when
    the defence costs nothing and protects, NaN when it neither costs nor protects)."""
    rows = []
    for (defence, kind), part in table.groupby(["defence", "answers"], sort=False):
        best = part.loc[part["fidelity"].idxmax()]
        base = table[(table["answers"] == kind)
                     & ~table["api"].map(lambda a: _defended(costs, a))]
        best_none = base["fidelity"].max() if len(base) else math.nan
        lost = 100 * (best["victim_accuracy"] - best["honest_accuracy"])
        protect = 100 * (best_none - best["fidelity"])
        if lost > 1e-9:
            per_point = protect / lost
        elif protect > 1e-9:
            per_point = math.inf
        else:
            per_point = math.nan
        rows.append({"defence": defence, "answers": kind, "best_attack": best["attack"],
                     "best_fidelity": best["fidelity"], "undefended_best": best_none,
                     "protection_pp": protect, "honest_accuracy": best["honest_accuracy"],
                     "honest_accuracy_lost_pp": lost, "l1_distortion": best["l1_distortion"],
                     "protection_per_point": per_point})
    return pd.DataFrame(rows)


def detection_table(attack_metrics: Sequence[Mapping[str, Any]],
                    fpr: Mapping[str, Any]) -> pd.DataFrame:
    """Queries until PRADA flagged each attack's stream (per seed; None = not within the
    examined prefix), and the benign false-positive rate beside them."""
    rows = []
    for m in attack_metrics:
        rows.append({"attack": m["experiment"], "seed": m["seed"],
                     "strategy": m["strategy"], "stream_queries": m.get("stream_queries"),
                     "examined": m.get("prada_examined"),
                     "flagged_at": m.get("prada_flagged_at"),
                     "benign_fpr": fpr.get("fpr"), "benign_clients": fpr.get("clients"),
                     "benign_queries_per_client": fpr.get("queries_per_client")})
    return pd.DataFrame(rows)


def _fmt(v: Any, scale: float = 100, digits: int = 1, signed: bool = False) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float) and math.isinf(v):
        return "inf"
    return f"{v * scale:+.{digits}f}" if signed else f"{v * scale:.{digits}f}"


def to_markdown(table: pd.DataFrame, summary: pd.DataFrame, detection: pd.DataFrame) -> str:
    """The matrix's three tables as Markdown."""
    lines = ["## Defence matrix", "",
             "Fidelity (%) of each attack's substitute behind each defence (mean ± sd "
             "over n seeds), its gain over the stage's no-theft control and its drop "
             "against the same attack without defence (pp); the API's honest-user "
             "accuracy on the test set and mean L1 distortion of soft answers.", "",
             "| defence | attack | answers | n | fidelity | gain over control | drop vs none "
             "| honest acc. | changed labels | L1 distortion |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in table.to_dict("records"):
        sd = "" if math.isnan(r["fidelity_sd"]) else f" ± {_fmt(r['fidelity_sd'])}"
        lines.append(
            f"| {r['defence']} | {r['attack']} | {r['answers']} | {r['n']} | "
            f"{_fmt(r['fidelity'])}{sd} | {_fmt(r['gain_over_control_pp'], 1, 1, True)} | "
            f"{_fmt(r['fidelity_drop_pp'], 1, 1, True)} | {_fmt(r['honest_accuracy'])} | "
            f"{_fmt(r['changed_answers'])} | {_fmt(r['l1_distortion'], 1, 3)} |")
    lines += ["", "### Protection per point of honest accuracy", "",
              "Per defence and answer kind: the best attacker's fidelity, how far the "
              "defence lowers it against no defence (pp), the honest accuracy it costs "
              "(pp), and their ratio.", "",
              "| defence | answers | best attack | best fidelity | protection (pp) "
              "| honest acc. lost (pp) | protection per point |",
              "|---|---|---|---|---|---|---|"]
    for r in summary.to_dict("records"):
        lines.append(
            f"| {r['defence']} | {r['answers']} | {r['best_attack']} | "
            f"{_fmt(r['best_fidelity'])} | {_fmt(r['protection_pp'], 1, 1, True)} | "
            f"{_fmt(r['honest_accuracy_lost_pp'], 1, 2)} | "
            f"{_fmt(r['protection_per_point'], 1, 2)} |")
    lines += ["", "### Detection (PRADA)", "",
              "Queries until PRADA flagged each attack's query stream against the "
              "undefended API (- = not flagged within the examined prefix), and the "
              "false-positive rate over simulated honest clients.", "",
              "| attack | seed | stream queries | examined | flagged at | benign FPR |",
              "|---|---|---|---|---|---|"]
    for r in detection.to_dict("records"):
        flagged = "-" if r["flagged_at"] is None or (isinstance(r["flagged_at"], float)
                                                      and math.isnan(r["flagged_at"])) \
            else str(int(r["flagged_at"]))
        fpr = r["benign_fpr"]
        lines.append(f"| {r['attack']} | {r['seed']} | {r['stream_queries']} | "
                     f"{r['examined']} | {flagged} | "
                     f"{_fmt(fpr) + '%' if fpr is not None else '-'} "
                     f"({r['benign_clients']} clients x {r['benign_queries_per_client']}) |")
    return "\n".join(lines) + "\n"


def heatmap(table: pd.DataFrame, paths: Sequence[str | Path]) -> None:
    """Fidelity gain over control (pp) per (defence, attack); blank = not a cell."""
    defences = list(dict.fromkeys(table["defence"]))
    attacks = list(dict.fromkeys(table["attack"]))
    grid = np.full((len(defences), len(attacks)), np.nan)
    for r in table.to_dict("records"):
        grid[defences.index(r["defence"]), attacks.index(r["attack"])] = \
            r["gain_over_control_pp"]
    fig = Figure(figsize=(1.2 + 1.1 * len(attacks), 1.0 + 0.5 * len(defences)))
    ax = fig.add_subplot()
    finite = grid[np.isfinite(grid)]
    lim = float(np.abs(finite).max()) if finite.size else 1.0
    im = ax.imshow(np.ma.masked_invalid(grid), cmap="RdBu_r", vmin=-lim, vmax=lim,
                   aspect="auto")
    for i in range(len(defences)):
        for j in range(len(attacks)):
            if np.isfinite(grid[i, j]):
                ax.text(j, i, f"{grid[i, j]:+.1f}", ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(attacks)), attacks, rotation=30, ha="right")
    ax.set_yticks(range(len(defences)), defences)
    ax.set_title("fidelity gain over control (pp)")
    fig.colorbar(im, ax=ax, shrink=0.8)
    save(fig, paths)


def utility_plot(summary: pd.DataFrame, paths: Sequence[str | Path]) -> None:
    """Utility against protection: per defence, the honest users' accuracy (left) and,
    for soft answers, the mean L1 distortion of their probabilities (right) against
    the best attacker's fidelity."""
    fig = Figure(figsize=(10, 4))
    left, right = fig.subplots(1, 2)
    for kind, marker in (("soft", "o"), ("hard", "s")):
        part = summary[summary["answers"] == kind]
        left.scatter(100 * part["honest_accuracy"], 100 * part["best_fidelity"],
                     marker=marker, label=f"{kind}-label attacks")
        for r in part.to_dict("records"):
            left.annotate(r["defence"], (100 * r["honest_accuracy"], 100 * r["best_fidelity"]),
                          fontsize=7, xytext=(3, 3), textcoords="offset points")
    left.set_xlabel("honest users' accuracy (%)")
    left.set_ylabel("best attacker's fidelity (%)")
    left.legend(fontsize=8)
    soft = summary[(summary["answers"] == "soft") & summary["l1_distortion"].notna()]
    right.scatter(soft["l1_distortion"], 100 * soft["best_fidelity"], marker="o")
    for r in soft.to_dict("records"):
        right.annotate(r["defence"], (r["l1_distortion"], 100 * r["best_fidelity"]),
                       fontsize=7, xytext=(3, 3), textcoords="offset points")
    right.set_xlabel("mean L1 distortion of served probabilities")
    right.set_ylabel("best soft-label attacker's fidelity (%)")
    fig.suptitle("utility against protection, per defence")
    save(fig, paths)
