"""Results tables, figures and the Snakemake report.

Unit tests build tables and figures from small synthetic metrics; the workflow tests
read the shared demo run (``demo_run``, tests/conftest.py) and never rerun it.
"""

from __future__ import annotations

import base64
import io
import json
import math
import os
import re
import statistics
import subprocess
import sys
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import ROOT, snakemake
from PIL import Image

from mextract import plots
from mextract.report import (
    DASH,
    ReferenceError,
    display_sections,
    load_reference,
    read_results,
    results_table,
    seeds_table,
    table_notes,
    to_html,
    to_latex,
    to_markdown,
    validate_reference,
    victims_table,
)

# ------------------------------------------------------------------ parsers of the 3 formats


def parse_markdown(text: str) -> dict[str, list[list[str]]]:
    """``### heading`` -> rows (header first) of the pipe table below it."""
    out: dict[str, list[list[str]]] = {}
    heading = None
    for line in text.splitlines():
        if line.startswith("### "):
            heading = line[4:].strip()
            out[heading] = []
        elif line.startswith("|") and heading is not None and not line.startswith("|---"):
            out[heading].append([c.strip() for c in line.strip().strip("|").split(" | ")])
    return out


class _HTMLTables(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.out: dict[str, list[list[str]]] = {}
        self.heading: str | None = None
        self._text: list[str] | None = None
        self._row: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag in ("h2", "th", "td"):
            self._text = []
        elif tag == "tr":
            self._row = []

    def handle_endtag(self, tag: str) -> None:
        if tag == "h2":
            self.heading = "".join(self._text or []).strip()
            self.out[self.heading] = []
        elif tag in ("th", "td") and self._row is not None:
            self._row.append("".join(self._text or []).strip())
        elif tag == "tr" and self.heading is not None:
            self.out[self.heading].append(self._row or [])
            self._row = None
        if tag in ("h2", "th", "td"):
            self._text = None

    def handle_data(self, data: str) -> None:
        if self._text is not None:
            self._text.append(data)


def parse_html(text: str) -> dict[str, list[list[str]]]:
    parser = _HTMLTables()
    parser.feed(text)
    return parser.out


def _untex(cell: str) -> str:
    for latex, plain in ((r"$\Delta$", "Δ"), (r"$\pm$", "±"), ("--", DASH), (r"\%", "%"),
                         (r"\_", "_"), (r"\&", "&"), (r"\#", "#")):
        cell = cell.replace(latex, plain)
    return cell.strip()


def parse_latex(text: str) -> dict[str, list[list[str]]]:
    out: dict[str, list[list[str]]] = {}
    for block in text.split(r"\begin{table}")[1:]:
        caption = _untex(re.search(r"\\caption\{(.*?)\}\n", block).group(1))
        head = block.split(r"\toprule")[1].split(r"\midrule")[0]
        body = block.split(r"\midrule")[1].split(r"\bottomrule")[0]
        rows = [line for part in (head, body) for line in part.strip().splitlines()]
        out[caption] = [[_untex(c) for c in row.rstrip().removesuffix(r"\\").split(" & ")]
                        for row in rows]
    return out


# ------------------------------------------------------------------ synthetic metrics
def metric(exp: str, stage: int, strategy: str, fidelity: float, queries: int = 0,
           victim: str = "v", **extra: object) -> dict:
    return {"experiment": exp, "stage": stage, "strategy": strategy, "queries": queries,
            "api": "none" if strategy == "control" else "hard", "victim": victim,
            "api_name": None if strategy == "control" else "hard",
            "test_accuracy": fidelity - 0.01, "fidelity": fidelity,
            "fidelity_on_victim_errors": fidelity / 2, "wall_time_s": 12.34, **extra}


REFERENCE = validate_reference({"dataset": "cifar10", "stages": {
    0: {"victim": {"test_accuracy": 0.94}},
    2: {"basic": {"test_accuracy": 0.6939, "fidelity": 0.7027, "queries": 1250000}},
    3: {"mixup": {"test_accuracy": 0.8523, "fidelity": 0.862, "trigger_wsr": 0.1168}},
}})

SYNTHETIC = [
    metric("basic", 2, "basic", 0.75, 500),
    metric("ctl2", 2, "control", 0.70),
    metric("mix3", 3, "mixup", 0.80, 900, trigger_wsr=0.25, dawn_agreement=0.9,
           dawn_p_value=1e-6, dawn_verified=True, api_honest_accuracy=0.7),
    metric("ctl3-w", 3, "control", 0.60, victim="w"),
    metric("ctl3", 3, "control", 0.65),
]


def test_project_reference_file_is_valid_and_complete():
    ref = load_reference(ROOT / "config" / "reference.yaml")
    expected = {0: {"victim"}, 1: {"kd", "random_erasing", "marich", "spsg"},
                2: {"basic", "augmentation", "boundary", "active_learning", "mixup"},
                3: {"basic", "augmentation", "boundary", "mixup"}}
    assert {s: set(v) for s, v in ref.stages.items()} == expected
    for stage in (1, 2, 3):
        for numbers in ref.stages[stage].values():
            assert 0 < numbers["test_accuracy"] <= numbers["fidelity"] < 1
    assert all("trigger_wsr" in n for n in ref.stages[3].values())


@pytest.mark.parametrize("stages, key", [
    ({7: {"kd": {"fidelity": 0.5}}}, "stages.7"),
    ({"one": {"kd": {"fidelity": 0.5}}}, "stages.one"),
    ({1: {"kd_typo": {"fidelity": 0.5}}}, "stages.1.kd_typo"),
    ({0: {"kd": {"test_accuracy": 0.5}}}, "stages.0.kd"),
    ({2: {"basic": {"fidelty": 0.5}}}, "stages.2.basic.fidelty"),
    ({2: {"basic": {"fidelity": 70.27}}}, "stages.2.basic.fidelity"),
])
def test_reference_rejects_unknown_keys_naming_them(tmp_path, stages, key):
    path = tmp_path / "reference.yaml"
    path.write_text(yaml.safe_dump({"stages": stages}))
    with pytest.raises(ReferenceError) as err:
        load_reference(path)
    assert f"'{key}'" in str(err.value)


def test_results_table_gain_over_control_and_study_columns():
    df = results_table(SYNTHETIC, REFERENCE).set_index("experiment")
    # controls first within their stage, stages in order
    assert list(df.index) == ["ctl2", "basic", "ctl3-w", "ctl3", "mix3"]
    assert df.loc["basic", "control"] == "ctl2"
    assert df.loc["basic", "fidelity_gain"] == pytest.approx(0.75 - 0.70)
    # matched by victim when a stage has several controls
    assert df.loc["mix3", "control"] == "ctl3"
    assert df.loc["mix3", "fidelity_gain"] == pytest.approx(0.80 - 0.65)
    assert math.isnan(df.loc["ctl2", "fidelity_gain"])
    assert df.loc["basic", "study_queries"] == 1250000
    assert df.loc["basic", "queries_vs_study"] == 500 - 1250000
    assert df.loc["basic", "fidelity_vs_study"] == pytest.approx(0.75 - 0.7027)
    assert df.loc["mix3", "trigger_wsr_vs_study"] == pytest.approx(0.25 - 0.1168)
    assert pd.isna(df.loc["basic", "trigger_wsr"]) and pd.isna(df.loc["ctl2", "study_fidelity"])
    assert df.loc["mix3", "dawn_verified"] == 1.0  # share of seeds verified
    # one run per experiment: n = 1, no sd
    assert (df["n"] == 1).all() and df["fidelity_sd"].isna().all()
    assert df["fidelity_gain_sd"].isna().all() and df["random_gain"].isna().all()


def test_three_formats_agree_and_show_stage3_columns_only_in_stage3():
    df = results_table(SYNTHETIC, REFERENCE)
    victims = victims_table([{"victim": "v", "arch": "resnet18", "width": 8,
                              "train_images": 100, "test_accuracy": 0.9,
                              "train_time_s": 3.0}], REFERENCE)
    md = parse_markdown(to_markdown(df, victims, ["note"]))
    assert md == parse_html(to_html(df, victims, ["note"]))
    assert md == parse_latex(to_latex(df, victims, ["note"]))
    assert list(md) == ["Stage 0: victim", "Stage 2: hard-label extraction",
                        "Stage 3: extraction against a defended API"]
    s2, s3 = md["Stage 2: hard-label extraction"], md["Stage 3: extraction against a defended API"]
    assert "WSR" not in s2[0] and "WSR" in s3[0] and "verified" in s3[0]
    basic = dict(zip(s2[0], s2[2], strict=True))
    assert basic["fid. gain over control"] == "+5.00 pp"
    assert basic["study fid."] == "70.27%" and basic["Δ queries"] == "-1,249,500"
    ctl = dict(zip(s2[0], s2[1], strict=True))
    assert ctl["experiment"] == "ctl2" and ctl["study acc."] == DASH
    mix = dict(zip(s3[0], s3[3], strict=True))
    assert (mix["WSR"], mix["verified"], mix["DAWN p"]) == ("25.00%", "1/1", "1e-06")
    assert mix["n"] == "1" and not any("±" in c for row in s2 + s3 for c in row)
    victim = dict(zip(*md["Stage 0: victim"], strict=True))
    assert (victim["test acc."], victim["Δ acc."]) == ("90.00%", "-4.00 pp")


# ------------------------------------------------------------------ several seeds
def seeded(seed: int, exp: str, stage: int, strategy: str, fidelity: float, queries: int = 0,
           **extra: object) -> dict:
    return metric(exp, stage, strategy, fidelity, queries, seed=seed,
                  baseline=extra.pop("baseline", None),
                  baseline_of=extra.pop("baseline_of", None), **extra)


STAGE3 = {"trigger_wsr": 0.25, "trigger_wsr_nontarget": 0.2, "dawn_agreement": 0.9,
          "dawn_p_value": 1e-6, "api_honest_accuracy": 0.7}

#: two seeds of everything except ``basic`` (one); the random baseline listed before
#: its adaptive experiment in the config
SEEDED = [
    *[seeded(s, "ctl2", 2, "control", f) for s, f in ((0, 0.70), (1, 0.72))],
    *[seeded(s, "al-random", 2, "random", f, 3000, baseline_of="al")
      for s, f in ((0, 0.76), (1, 0.75))],
    seeded(0, "basic", 2, "basic", 0.74, 500),
    *[seeded(s, "al", 2, "active_learning", f, q, baseline="al-random")
      for s, f, q in ((0, 0.80, 3000), (1, 0.84, 3000))],
    *[seeded(s, "mix3", 3, "mixup", f, 900, dawn_verified=v, **STAGE3)
      for s, f, v in ((0, 0.80, True), (1, 0.82, False))],
    *[seeded(s, "ctl3", 3, "control", 0.65) for s in (0, 1)],
]


def test_seeds_give_mean_sample_sd_and_n():
    df = results_table(SEEDED, REFERENCE).set_index("experiment")
    al = df.loc["al"]
    assert al["fidelity"] == pytest.approx(0.82)
    assert al["fidelity_sd"] == pytest.approx(0.028284271247461905)  # ddof = 1
    assert al["test_accuracy"] == pytest.approx(0.81)
    assert (al["n"], al["seeds"]) == (2, "0,1")
    assert al["queries"] == 3000 and al["queries_sd"] == 0
    basic = df.loc["basic"]
    assert (basic["n"], basic["seeds"], basic["fidelity"]) == (1, "0", 0.74)
    assert math.isnan(basic["fidelity_sd"]) and math.isnan(basic["fidelity_gain_sd"])
    assert df.loc["mix3", "dawn_verified"] == 0.5  # one of two seeds verified
    assert df.loc["mix3", "trigger_wsr_nontarget"] == pytest.approx(0.2)
    # the study's columns compare the means
    assert df.loc["mix3", "fidelity_vs_study"] == pytest.approx(0.81 - 0.862)


def test_gains_over_control_and_random_baseline_pair_the_seeds():
    df = results_table(SEEDED, REFERENCE)
    # the random baseline comes right below its adaptive experiment, controls first
    assert list(df["experiment"]) == ["ctl2", "basic", "al", "al-random", "ctl3", "mix3"]
    df = df.set_index("experiment")
    assert df.loc["al", "baseline"] == "al-random"
    assert df.loc["al-random", "baseline_of"] == "al"
    # gain over random = mean(adaptive) - mean(its random baseline)
    assert df.loc["al", "random_gain"] == pytest.approx(0.82 - 0.755)
    # same seeds: sd of the per-seed differences (0.80-0.76, 0.84-0.75)
    assert df.loc["al", "random_gain_sd"] == pytest.approx(statistics.stdev([0.04, 0.09]))
    assert df.loc["al", "fidelity_gain"] == pytest.approx(0.82 - 0.71)
    assert df.loc["al", "fidelity_gain_sd"] == pytest.approx(statistics.stdev([0.10, 0.12]))
    assert df[["random_gain"]].drop(index="al").isna().all().all()
    # other seed sets: difference of the means, no sd
    assert df.loc["basic", "fidelity_gain"] == pytest.approx(0.74 - 0.71)
    unpaired = results_table([m for m in SEEDED if not (m["experiment"] == "al-random"
                                                        and m["seed"] == 1)])
    al = unpaired.set_index("experiment").loc["al"]
    assert al["random_gain"] == pytest.approx(0.82 - 0.76) and math.isnan(al["random_gain_sd"])
    # without the ``baseline`` key, the random experiment's ``baseline_of`` pairs them
    legacy = [{**m, "baseline": None} for m in SEEDED]
    assert results_table(legacy).set_index("experiment").loc["al", "random_gain"] == \
        pytest.approx(0.82 - 0.755)


def test_two_runs_of_one_seed_are_an_error():
    with pytest.raises(ValueError, match="seed 0"):
        results_table([SEEDED[0], SEEDED[0]])


def test_display_shows_mean_pm_sd_n_and_both_gains():
    df = results_table(SEEDED, REFERENCE)
    md = parse_markdown(to_markdown(df, notes=["note"]))
    assert md == parse_html(to_html(df, notes=["note"]))
    assert md == parse_latex(to_latex(df, notes=["note"]))
    s2, s3 = md["Stage 2: hard-label extraction"], md["Stage 3: extraction against a defended API"]
    rows = {r[0]: dict(zip(s2[0], r, strict=True)) for r in s2[1:]}
    al, basic, rnd = rows["al"], rows["basic"], rows["al-random"]
    assert al["fidelity"] == "82.00 ± 2.83%" and al["n"] == "2"
    assert al["test acc."] == "81.00 ± 2.83%"
    assert al["queries"] == "3,000"  # the seeds spent the same: no ±
    assert al["fid. gain over control"] == "+11.00 ± 1.41 pp"
    assert al["fid. gain over random (same budget)"] == "+6.50 ± 3.54 pp"
    assert rnd["strategy"] == "random (baseline of al)"
    assert rnd["fid. gain over random (same budget)"] == DASH
    # n = 1: just the mean
    assert basic["n"] == "1" and basic["fidelity"] == "74.00%"
    assert not any("±" in cell for cell in basic.values())
    assert "±" in rows["ctl2"]["fidelity"] and rows["ctl2"]["fid. gain over control"] == DASH
    # WSR (all images) and WSR (non-target) only in Stage 3
    assert "WSR" not in s2[0] and "WSR (non-target)" not in s2[0]
    mix = dict(zip(s3[0], s3[2], strict=True))
    assert (mix["WSR"], mix["WSR (non-target)"]) == ("25.00 ± 0.00%", "20.00 ± 0.00%")
    assert mix["verified"] == "1/2" and mix["fid. gain over control"] == "+16.00 ± 1.41 pp"
    assert mix["Δ WSR"] == "+13.32 pp"  # our mean minus the study's
    assert "fid. gain over random (same budget)" not in s3[0]  # no baseline in Stage 3
    queries = results_table([{**m, "queries": 3000 + 10 * m["seed"]} for m in SEEDED])
    rows = {r[0]: r for r in display_sections(queries)[0][2].itertuples(index=False)}
    assert rows["al"][list(display_sections(queries)[0][2].columns).index("queries")] \
        == "3,005 ± 7.1"
    notes = " ".join(table_notes("cifar10", "t", REFERENCE))
    assert "mean ± sample standard deviation" in notes and "gain over random" in notes


def test_csv_round_trips():
    df = results_table(SEEDED, REFERENCE)
    back = read_results(io.StringIO(df.to_csv(index=False)))
    assert list(back.columns) == list(df.columns)
    pd.testing.assert_frame_equal(back, df)
    assert list(back["seeds"]) == ["0,1", "0", "0,1", "0,1", "0,1", "0,1"]
    per_seed = seeds_table(SEEDED)
    assert len(per_seed) == len(SEEDED)
    back = pd.read_csv(io.StringIO(per_seed.to_csv(index=False)))
    assert list(back.columns) == list(per_seed.columns)
    al = back[back["experiment"] == "al"].set_index("seed")
    assert list(al["fidelity"]) == [0.80, 0.84]
    assert al.loc[1, "random_gain"] == pytest.approx(0.84 - 0.75)
    assert al.loc[1, "fidelity_gain"] == pytest.approx(0.84 - 0.72)
    assert list(back["experiment"].drop_duplicates()) == ["ctl2", "basic", "al", "al-random",
                                                          "ctl3", "mix3"]


# ------------------------------------------------------------------ figures (synthetic)
def check_image(path: Path) -> None:
    assert path.exists() and path.stat().st_size > 0, path
    if path.suffix == ".png":
        with Image.open(path) as im:
            im.verify()
            assert im.format == "PNG" and min(im.size) > 100
    else:
        assert ET.parse(path).getroot().tag.endswith("svg")


def test_fidelity_plot_draws_lines_points_and_control(tmp_path):
    hist = pd.DataFrame({"epoch": [1, 2, 3], "queries": [100, 100, 100],
                         "fidelity": [0.3, 0.6, 0.7]})
    adaptive = pd.DataFrame({"epoch": [1, 2, 3], "queries": [50, 120, 300],
                             "fidelity": [0.2, 0.5, 0.65]})
    control = pd.DataFrame({"epoch": [1, 2], "queries": [0, 0], "fidelity": [0.5, 0.8]})
    runs = [(metric("c", 1, "control", 0.8), control),
            (metric("kd", 1, "kd", 0.7, 100), hist),
            (metric("m", 1, "marich", 0.66, 300), adaptive)]
    paths = [tmp_path / "f.png", tmp_path / "f.svg"]
    fig = plots.fidelity_vs_queries(runs, 1, paths)
    for p in paths:
        check_image(p)
    lines = fig.axes[0].get_lines()
    control_line = [ln for ln in lines if list(ln.get_ydata()) == [0.8, 0.8]]
    assert control_line and list(control_line[0].get_xdata()) == [0, 1]  # axes-wide
    assert any(list(ln.get_xdata()) == [100.0] and list(ln.get_ydata()) == [0.7]
               for ln in lines)  # the fixed-count strategy's final point
    assert any(list(ln.get_xdata()) == [50, 120, 300] for ln in lines)  # adaptive curve
    assert fig.axes[0].get_xscale() == "log"


def test_bar_chart_and_victim_curve(tmp_path):
    table = results_table([m for m in SYNTHETIC if m["stage"] == 3], REFERENCE)
    fig = plots.accuracy_fidelity_bars(table, 3, [tmp_path / "b.png", tmp_path / "b.svg"])
    check_image(tmp_path / "b.png")
    check_image(tmp_path / "b.svg")
    heights = sorted(round(p.get_height(), 4) for p in fig.axes[0].patches)
    # mix3: accuracy, fidelity, WSR, ours and the study's
    assert heights == sorted([0.79, 0.8523, 0.80, 0.862, 0.25, 0.1168])
    ys = {ln.get_ydata()[0] for ln in fig.axes[0].get_lines()}
    assert {0.60, 0.65} <= ys  # the controls' fidelity reference lines
    hist = pd.DataFrame({"epoch": [1, 2], "loss": [2.0, 1.0], "test_accuracy": [0.5, 0.9]})
    plots.victim_training([({"victim": "v", "arch": "resnet18", "width": 8,
                             "test_accuracy": 0.9}, hist)],
                          [tmp_path / "v.png", tmp_path / "v.svg"], REFERENCE)
    check_image(tmp_path / "v.png")
    check_image(tmp_path / "v.svg")


def test_plots_build_with_two_seeds_per_experiment(tmp_path):
    def hist(queries: list[int], fidelity: list[float]) -> pd.DataFrame:
        return pd.DataFrame({"epoch": range(1, len(queries) + 1), "queries": queries,
                             "fidelity": fidelity})

    runs = [(m, hist([0, 0], [0.6, m["fidelity"]])) for m in SEEDED
            if m["experiment"] == "ctl2"]
    runs += [(m, hist([3000, 3000], [0.7, m["fidelity"]])) for m in SEEDED
             if m["experiment"] == "al-random"]
    runs += [(m, hist([500, 500], [0.7, m["fidelity"]])) for m in SEEDED
             if m["experiment"] == "basic"]
    runs += [(m, hist([1000, 2000, 3000], [0.5, 0.7, m["fidelity"]])) for m in SEEDED
             if m["experiment"] == "al"]
    paths = [tmp_path / "f.png", tmp_path / "f.svg"]
    fig = plots.fidelity_vs_queries(runs, 2, paths)
    for p in paths:
        check_image(p)
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert len(labels) == 4  # one entry per experiment, not per seed
    assert any(label.startswith("al (active_learning), 2 seeds") for label in labels)
    curves = [ln for ln in ax.get_lines() if list(ln.get_xdata()) == [1000, 2000, 3000]]
    assert sorted(ln.get_ydata()[-1] for ln in curves) == [0.80, 0.84]  # one per seed
    assert len({ln.get_color() for ln in curves}) == 1
    # the random baseline: its adaptive experiment's colour, dashed
    diamonds = [ln for ln in ax.get_lines() if ln.get_marker() == "D"]
    random = next(ln for ln in diamonds if ln.get_ydata()[0] == pytest.approx(0.755))
    assert random.get_color() == curves[0].get_color()
    control = next(ln for ln in ax.get_lines() if list(ln.get_ydata()) == [0.71, 0.71])
    assert control is not None and ax.patches  # the control's min-max band

    table = results_table(SEEDED, REFERENCE)
    fig = plots.accuracy_fidelity_bars(table[table["stage"] == 2], 2,
                                       [tmp_path / "b.png", tmp_path / "b.svg"])
    check_image(tmp_path / "b.png")
    check_image(tmp_path / "b.svg")
    ax = fig.axes[0]
    # error bars (± sd) for the two-seed attacks al and al-random only, per metric
    segments = [seg for c in ax.collections for seg in c.get_segments()]
    spans = sorted(round(seg[1][1] - seg[0][1], 6) for seg in segments)
    sd = statistics.stdev([0.80, 0.84])
    assert spans == sorted([round(2 * v, 6) for v in (sd, sd, 0.0070710678, 0.0070710678)])
    ticks = [t.get_text() for t in ax.get_xticklabels()]
    assert ticks[0] == "basic\n(basic)\nn = 1" and ticks[1].endswith("n = 2")


# ------------------------------------------------------------------ the demo workflow
def demo_config(run: Path) -> dict:
    return yaml.safe_load((run / "config" / "demo.yaml").read_text())


def plot_files(run: Path) -> list[Path]:
    stages = sorted({e["stage"] for e in demo_config(run)["experiments"].values()})
    names = [f"stage{s}_{kind}" for s in stages
             for kind in ("fidelity_vs_queries", "accuracy_fidelity")] + ["victims_training"]
    return [run / "results" / "report" / f"{n}.{ext}" for n in names for ext in ("png", "svg")]


@pytest.mark.workflow
def test_demo_tables_agree_with_each_other_and_the_metrics(demo_run):
    results = demo_run / "results"
    md = parse_markdown((results / "table.md").read_text())
    assert md == parse_latex((results / "table.tex").read_text())
    assert md == parse_html((results / "report" / "table.html").read_text())
    csv = read_results(results / "table.csv").set_index("experiment")
    exps = demo_config(demo_run)["experiments"]
    # the configured experiments and the equal-budget random baselines the workflow adds
    assert set(exps) <= set(csv.index)
    assert all(csv.loc[e, "baseline_of"] in exps for e in set(csv.index) - set(exps))
    # every experiment ran once per seed: results/experiments/<exp>/seed<k>/metrics.json
    runs = {e: sorted((json.loads(p.read_text())
                       for p in (results / "experiments" / e).glob("seed*/metrics.json")),
                      key=lambda m: m["seed"])
            for e in csv.index}
    for exp, ms in runs.items():
        # an experiment's own seeds, else its adaptive experiment's, else the top level's
        own = exps.get(exp) or exps[csv.loc[exp, "baseline_of"]]
        seeds = own.get("seeds", demo_config(demo_run).get("seeds"))
        assert ms, exp
        if seeds is not None:
            assert [m["seed"] for m in ms] == sorted(seeds), exp
    per_seed = pd.read_csv(results / "table_seeds.csv")
    assert len(per_seed) == sum(map(len, runs.values()))
    sections = {int(h.split(":")[0].split()[1]): rows for h, rows in md.items()}

    def mean(ms: list[dict], key: str) -> float:
        return statistics.fmean(m[key] for m in ms)

    for exp, ms in runs.items():
        m, n = ms[0], len(ms)
        assert csv.loc[exp, "n"] == n
        assert csv.loc[exp, "seeds"] == ",".join(str(r["seed"]) for r in ms)
        header, *rows = sections[m["stage"]]
        row = dict(zip(header, next(r for r in rows if r[0] == exp), strict=True))
        assert row["n"] == str(n)
        for key in ("queries", "test_accuracy", "fidelity", "fidelity_on_victim_errors"):
            assert csv.loc[exp, key] == pytest.approx(mean(ms, key)), (exp, key)
            if n > 1:
                sd = statistics.stdev(r[key] for r in ms)
                assert csv.loc[exp, f"{key}_sd"] == pytest.approx(sd), (exp, key)
            else:
                assert math.isnan(csv.loc[exp, f"{key}_sd"]), (exp, key)
        if len({r["queries"] for r in ms}) == 1:
            assert row["queries"] == f"{m['queries']:,}"
        for key, column in (("test_accuracy", "test acc."), ("fidelity", "fidelity"),
                            ("fidelity_on_victim_errors", "fid. on victim errors")):
            assert row[column].startswith(f"{100 * mean(ms, key):.2f}"), (exp, column)
            assert ("±" in row[column]) == (n > 1), (exp, column)
        if m["strategy"] != "control":
            control = next(runs[c] for c in runs if runs[c][0]["strategy"] == "control"
                           and runs[c][0]["stage"] == m["stage"])
            gain = mean(ms, "fidelity") - mean(control, "fidelity")
            assert csv.loc[exp, "fidelity_gain"] == pytest.approx(gain)
            assert row["fid. gain over control"].startswith(f"{100 * gain:+.2f}")
        if m.get("baseline"):
            gain = mean(ms, "fidelity") - mean(runs[m["baseline"]], "fidelity")
            assert csv.loc[exp, "random_gain"] == pytest.approx(gain)
            assert row["fid. gain over random (same budget)"].startswith(f"{100 * gain:+.2f}")
            # the random baseline is the row right below
            names = [r[0] for r in rows]
            assert names[names.index(exp) + 1] == m["baseline"]
    header, *rows = md["Stage 0: victim"]
    assert len(rows) == len(demo_config(demo_run)["victims"])
    for row in rows:
        victim = json.loads((results / "victims" / row[0] / "metrics.json").read_text())
        cells = dict(zip(header, row, strict=True))
        assert cells["test acc."] == f"{100 * victim['test_accuracy']:.2f}%"
        if "WSR" in cells:
            assert cells["WSR"] == f"{100 * victim['trigger_wsr']:.2f}%"


@pytest.mark.workflow
def test_demo_plots_are_valid_images(demo_run):
    for path in plot_files(demo_run):
        check_image(path)


@pytest.mark.workflow
def test_snakemake_report_embeds_plots_table_and_captions(demo_run):
    snakemake(demo_run, "--report", "results/report.html", "--configfile", "config/demo.yaml")
    page = (demo_run / "results" / "report.html").read_text()
    # the report stores its results as JSON inside <script> tags
    results = json.loads(re.search(r"var results = (\{.*?\});\n", page, re.S).group(1))
    categories = json.loads(re.search(r"var categories = (\{.*?\});\n", page, re.S).group(1))
    description = json.loads(re.search(r"var workflow_desc = (\".*?\");\n", page).group(1))
    stages = sorted({e["stage"] for e in demo_config(demo_run)["experiments"].values()})
    assert {c.split(":")[0] for c in categories} >= {f"Stage {s}" for s in [0, *stages]}
    phrases = {"fidelity_vs_queries": "fidelity against victim queries spent",
               "accuracy_fidelity": "test accuracy and fidelity, ours beside the",
               "victims_training": "Stage 0: the victim"}
    for path in (p for p in plot_files(demo_run) if p.suffix == ".png"):
        entry = results[f"results/report/{path.name}"]
        kind = next(k for k in phrases if k in path.name)
        assert phrases[kind] in entry["caption"], entry["caption"]
        assert "Produced by rule" in entry["caption"]
        stage = path.name[5] if path.name.startswith("stage") else "0"
        assert f"Stage {stage}" in entry["caption"]
        assert entry["data_uri"].startswith("data:image/png;") and ";base64," in entry["data_uri"]
        assert base64.b64decode(entry["data_uri"].split(",", 1)[1]) == path.read_bytes()
    table = results["results/report/table.html"]
    assert "fidelity gain over control" in table["caption"]
    assert "gain over random" in table["caption"] and "seed" in table["caption"]
    embedded = base64.b64decode(table["data_uri"].split(",", 1)[1]).decode()
    assert embedded == (demo_run / "results" / "report" / "table.html").read_text()
    cfg = demo_config(demo_run)
    assert cfg["title"] in description and f"``{cfg['dataset']['name']}``" not in description
    assert f"<tt class=\"docutils literal\">{cfg['dataset']['name']}</tt>" in description
    assert f"{cfg['substitute']['train']['epochs']} epochs" in description
    assert "System Message" not in page  # no reStructuredText errors in any caption


def test_report_modules_import_no_torch():
    """The report jobs (tables, plots, matrix, run summary) log and write through
    mextract.runtime and mextract.io without importing torch (~2 s per job)."""
    code = ("import sys; import mextract.runtime, mextract.io, mextract.report, "
            "mextract.matrix, mextract.plots, mextract.timings; "
            "sys.exit('torch' in sys.modules)")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    assert subprocess.run([sys.executable, "-c", code], env=env).returncode == 0


def test_quick_imports_pauses_the_collector_and_always_restores_it():
    """mextract.runtime.quick_imports: no collection during the imports, what they
    created frozen, the collector back on afterwards, also when an import fails."""
    code = """
import gc, sys
from mextract.runtime import quick_imports
with quick_imports():
    assert not gc.isenabled()
    import fractions, decimal
assert gc.isenabled() and gc.get_freeze_count() > 0
try:
    with quick_imports():
        import mextract_no_such_module
except ImportError:
    pass
sys.exit(0 if gc.isenabled() else 3)
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    assert subprocess.run([sys.executable, "-c", code], env=env).returncode == 0


def test_every_workflow_script_imports_the_library_inside_quick_imports():
    """A script that imports mextract (and so torch) outside ``with quick_imports()``
    pays ~2 s of garbage collection per job (docs/performance.md)."""
    import ast

    for path in sorted((ROOT / "workflow" / "scripts").glob("*.py")):
        body = ast.parse(path.read_text()).body
        outside = [node.module for node in body if isinstance(node, ast.ImportFrom)
                   and node.module and node.module.startswith("mextract")
                   and [a.name for a in node.names] != ["quick_imports"]]
        outside += [a.name for node in body if isinstance(node, ast.Import)
                    for a in node.names if a.name not in ("sys",)]
        wrapped = [node for node in body if isinstance(node, ast.With)
                   and ast.unparse(node.items[0].context_expr) == "quick_imports()"]
        assert not outside, f"{path.name} imports {outside} outside quick_imports()"
        assert len(wrapped) == 1 and all(
            isinstance(n, (ast.Import, ast.ImportFrom)) for n in wrapped[0].body), path.name


def test_history_csv_is_what_pandas_writes():
    from mextract.io import rows_csv

    rows = [{"epoch": 1, "loss": 0.123456789012, "test_accuracy": None, "flag": True},
            {"epoch": 2, "loss": 1e-7, "test_accuracy": 0.5, "fidelity": 0.25}]
    assert rows_csv(rows) == pd.DataFrame(rows).to_csv(index=False)
    assert pd.read_csv(io.StringIO(rows_csv(rows))).shape == (2, 5)
