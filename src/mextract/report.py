"""Results tables built from the metrics files only, beside the reference study's numbers.

Every experiment runs once per substitute seed; its row aggregates the seeds: each
number is the mean with the sample standard deviation (``<key>_sd``) over the ``n``
seeds, and the per-seed numbers are in :func:`seeds_table`. Every attack is compared
with its stage's ``control`` experiment (true labels, zero queries): *fidelity gain* =
mean fidelity minus the control's, i.e. how much closer to the victim the stolen labels
bring a substitute than honest training on the same pool does. An adaptive selection
strategy is also compared with its equal-budget random baseline (``<exp>-random``, the
same number of queries on uniformly random inputs): *gain over random* = its mean
fidelity minus the baseline's, how much the selection itself buys. *Fidelity on victim
errors* (agreement on the test images the victim gets wrong) separates copying the
victim from merely being accurate (Jagielski et al., "High Accuracy and High Fidelity
Extraction of Neural Networks", USENIX Security 2020). The ``pool`` column names the
attacker pool of experiments that do not draw from the split's attacker half
(:mod:`mextract.pools`; shown only in stages that have one). The reference study's numbers
come from one data file, ``config/reference.yaml`` (see :func:`load_reference`).

The same display table (:func:`display_sections`) is written as Markdown, booktabs
LaTeX and HTML, so the three files agree cell for cell; ``table.csv`` holds the raw
numbers (fractions, counts, seconds; means and sds) and ``table_seeds.csv`` the
per-seed ones. The module does not import torch, so the workflow can read
:data:`STAGE_TITLES` while it builds the DAG.
"""

from __future__ import annotations

import html
import json
import math
import statistics
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
#: Stage-3 metrics keys, present only in those experiments' metrics.json. ``trigger_wsr``
#: is the study's WSR (all stamped test images), ``trigger_wsr_nontarget`` the same over
#: the images whose true class is not the target.
VERIFICATION_KEYS = ("trigger_wsr", "trigger_wsr_nontarget", "dawn_agreement", "dawn_p_value",
                     "dawn_verified", "api_honest_accuracy")
#: metrics compared with the study (our mean minus the study's, in ``<key>_vs_study``)
COMPARED = ("test_accuracy", "fidelity", "queries", "trigger_wsr")
#: per-seed numbers summarised over an experiment's seeds: ``<key>`` is the mean,
#: ``<key>_sd`` the sample standard deviation (``dawn_verified``: the share of seeds
#: verified, no sd)
AGGREGATED = ("queries", "test_accuracy", "fidelity", "fidelity_on_victim_errors",
              "trigger_wsr", "trigger_wsr_nontarget", "dawn_agreement", "dawn_p_value",
              "api_honest_accuracy", "wall_time_s")
#: fidelity differences: over the stage's control, over the equal-budget random baseline
GAINS = ("fidelity_gain", "random_gain")
#: strategies whose experiments are the equal-budget random baselines of adaptive ones
RANDOM_BASELINES = ("random", "random_boundary")


def _with_sd(*keys: str) -> list[str]:
    return [c for key in keys for c in (key, f"{key}_sd")]


#: columns of :func:`results_table` (one row per experiment)
COLUMNS = ["stage", "experiment", "strategy", "api_name", "api", "victim", "pool", "baseline",
           "baseline_of", "seeds", "n",
           *_with_sd("queries", "test_accuracy", "fidelity", "fidelity_on_victim_errors"),
           "control", *_with_sd(*GAINS),
           *_with_sd("trigger_wsr", "trigger_wsr_nontarget", "dawn_agreement",
                     "dawn_p_value"), "dawn_verified", *_with_sd("api_honest_accuracy"),
           *_with_sd("wall_time_s"),
           *[c for key in COMPARED for c in (f"study_{key}", f"{key}_vs_study")],
           "study_note"]
#: the text columns of :func:`results_table` (pandas "string" dtype, missing = NA)
TEXT_COLUMNS = ("experiment", "strategy", "api_name", "api", "victim", "pool", "baseline",
                "baseline_of", "seeds", "control", "study_note")
#: columns of :func:`seeds_table` (one row per experiment and seed, raw numbers)
SEED_COLUMNS = ["stage", "experiment", "seed", "strategy", "api_name", "api", "victim",
                "baseline", "baseline_of", "queries", "test_accuracy", "fidelity",
                "fidelity_on_victim_errors", "control", *GAINS, *VERIFICATION_KEYS,
                "wall_time_s"]
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
    """A float, NaN for missing values (None, absent, text); booleans count 1 / 0."""
    if value is None or isinstance(value, str) or value is pd.NA:
        return math.nan
    return float(value)


def _mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof = 1) of the non-NaN values; NaN for the
    sd of a single value, both NaN for none."""
    xs = [v for v in values if not math.isnan(v)]
    if not xs:
        return math.nan, math.nan
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else math.nan)


def _seed_key(seed: Any) -> tuple[bool, float]:
    return (seed is None, 0.0 if seed is None else float(seed))


def _group(metrics: Sequence[Mapping[str, Any]]) -> dict[str, dict[Any, dict]]:
    """experiment -> {seed: metrics}, experiments in order of first appearance, seeds
    ascending. A metrics dict without ``seed`` is the experiment's only run (seed None).
    Raises ValueError for two runs of one (experiment, seed) or seeds of one experiment
    that disagree on its stage or strategy."""
    groups: dict[str, dict[Any, dict]] = {}
    for m in metrics:
        name, seed = m.get("experiment"), m.get("seed")
        runs = groups.setdefault(name, {})
        if seed in runs:
            raise ValueError(f"experiment {name!r}: two metrics files for seed {seed!r}")
        if runs:
            first = next(iter(runs.values()))
            for key in ("stage", "strategy"):
                if first.get(key) != m.get(key):
                    raise ValueError(f"experiment {name!r}: seeds disagree on {key} "
                                     f"({first.get(key)!r}, {m.get(key)!r})")
        runs[seed] = dict(m)
    return {name: dict(sorted(runs.items(), key=lambda kv: _seed_key(kv[0])))
            for name, runs in groups.items()}


def _control_for(m: Mapping[str, Any], controls: Sequence[Mapping[str, Any]]) -> dict | None:
    """The control experiment an attack is compared with: the first control of the same
    stage and victim, else the stage's only control, else none."""
    same_stage = [c for c in controls if c.get("stage") == m.get("stage")]
    same_victim = [c for c in same_stage if c.get("victim") == m.get("victim")]
    if same_victim:
        return dict(same_victim[0])
    return dict(same_stage[0]) if len(same_stage) == 1 else None


def _is_random_baseline(m: Mapping[str, Any]) -> bool:
    return m.get("strategy") in RANDOM_BASELINES or bool(m.get("baseline_of"))


@dataclass(frozen=True)
class _Links:
    """Who is compared with whom: experiment -> its control / its random baseline, and
    the order of the rows."""

    control: dict[str, str | None]
    baseline: dict[str, str | None]
    order: list[str]


def _links(groups: Mapping[str, Mapping[Any, Mapping[str, Any]]]) -> _Links:
    info = {name: next(iter(runs.values())) for name, runs in groups.items()}
    controls = [m for m in info.values() if m.get("strategy") == "control"]
    control = {name: None if m.get("strategy") == "control" else
               (_control_for(m, controls) or {}).get("experiment")
               for name, m in info.items()}
    # an adaptive experiment's baseline: its own ``baseline`` key, else the random
    # experiment whose ``baseline_of`` names it
    baseline: dict[str, str | None] = {
        name: None if _is_random_baseline(m) else m.get("baseline") for name, m in info.items()}
    for name, m in info.items():
        of = m.get("baseline_of")
        if of in baseline and baseline[of] is None and of != name \
                and not _is_random_baseline(info[of]):
            baseline[of] = name
    # rows: by stage, each stage's control first, otherwise config order; a random
    # baseline right below its adaptive experiment (same stage)
    index = {name: i for i, name in enumerate(info)}
    below: dict[str, str] = {}  # random baseline -> the adaptive experiment it follows
    for name, b in baseline.items():
        if b in info and b != name and b not in below and _is_random_baseline(info[b]) \
                and info[b].get("stage") == info[name].get("stage"):
            below[b] = name
    order: list[str] = []

    def emit(name: str) -> None:
        if name in order:
            return
        order.append(name)
        for r in sorted((r for r, a in below.items() if a == name), key=index.get):
            emit(r)

    top = sorted((n for n in info if n not in below),
                 key=lambda n: (int(info[n]["stage"]),
                                info[n].get("strategy") != "control", index[n]))
    for name in top:
        emit(name)
    order += [n for n in info if n not in order]  # only if ``below`` had a cycle
    return _Links(control, baseline, order)


def _gain(ours: Mapping[Any, Mapping[str, Any]], theirs: Mapping[Any, Mapping[str, Any]],
          key: str = "fidelity") -> tuple[float, float]:
    """Our mean ``key`` minus theirs, and an sd when the seeds pair up: if both ran the
    same seeds (each with a value), the gain is the mean of the per-seed differences
    (equal to the difference of the means) and the sd that of those differences
    (ddof = 1); otherwise the difference of the means and no sd."""
    a = {s: _num(m.get(key)) for s, m in ours.items()}
    b = {s: _num(m.get(key)) for s, m in theirs.items()}
    a = {s: v for s, v in a.items() if not math.isnan(v)}
    b = {s: v for s, v in b.items() if not math.isnan(v)}
    if not a or not b:
        return math.nan, math.nan
    if set(a) == set(b):
        return _mean_sd([a[s] - b[s] for s in a])
    return statistics.fmean(a.values()) - statistics.fmean(b.values()), math.nan


def attacker_pool(m: Mapping[str, Any]) -> str | None:
    """The ``pool`` column: the attacker pool's description (metrics.json ``pool``) when
    it is not the split's attacker half (None: the split's, the default), so that the
    displayed column appears only in stages with another pool."""
    pool = m.get("pool")
    return None if not pool or str(pool).startswith("split") else str(pool)


def _seeds_text(seeds: Sequence[Any]) -> str:
    return ",".join(str(s) for s in seeds if s is not None)


def results_table(metrics: Sequence[Mapping[str, Any]],
                  reference: Reference | None = None) -> pd.DataFrame:
    """One row per experiment, aggregating its seeds; columns :data:`COLUMNS`.

    ``metrics``: every run's metrics.json (several per experiment, one per substitute
    seed, told apart by ``seed``; a run without ``seed`` is its experiment's only one).
    Rows go by stage, each stage's control first, otherwise in the given order, except
    that a random-baseline experiment comes right below the adaptive experiment it is
    matched to. ``seeds`` lists the seeds ("0,1"), ``n`` counts them.

    For each of :data:`AGGREGATED`, ``<key>`` is the mean over the seeds and ``<key>_sd``
    the sample standard deviation (ddof = 1; NaN when n = 1 or when fewer than two seeds
    have the number); ``dawn_verified`` is the share of seeds verified.
    ``fidelity_gain`` is the mean fidelity minus that of the stage's control (same
    victim; NaN for the control itself and where the stage has none), ``random_gain``
    the mean fidelity minus that of the experiment's equal-budget random baseline (named
    in ``baseline``; NaN where there is none). A gain has an sd (``<gain>_sd``) only when
    the two experiments ran the same seeds: each seed of the attack is then paired with
    the same seed of the other (the same substitute seed) and the sd is that of the
    per-seed differences; with other seed sets it is NaN.
    ``study_<key>`` is the reference number for the experiment's (stage, strategy) and
    ``<key>_vs_study`` our mean minus it.
    """
    reference = reference or Reference()
    groups = _group(metrics)
    links = _links(groups)
    rows = []
    for name in links.order:
        runs = groups[name]
        m = next(iter(runs.values()))
        row: dict[str, Any] = {c: m.get(c) for c in
                               ("stage", "experiment", "strategy", "api_name", "api", "victim",
                                "baseline_of")}
        row["pool"] = attacker_pool(m)
        row["seeds"] = _seeds_text(list(runs))
        row["n"] = len(runs)
        for key in AGGREGATED:
            row[key], row[f"{key}_sd"] = _mean_sd([_num(r.get(key)) for r in runs.values()])
        verified = [_num(r.get("dawn_verified")) for r in runs.values()]
        row["dawn_verified"] = _mean_sd(verified)[0]
        row["control"] = links.control[name]
        row["baseline"] = links.baseline[name]
        for gain, other in (("fidelity_gain", row["control"]), ("random_gain", row["baseline"])):
            row[gain], row[f"{gain}_sd"] = (_gain(runs, groups[other]) if other in groups
                                            else (math.nan, math.nan))
        ref = reference.get(int(m["stage"]), m.get("strategy"))
        for key in COMPARED:
            row[f"study_{key}"] = _num(ref.get(key))
            row[f"{key}_vs_study"] = _num(row[key]) - row[f"study_{key}"]
        row["study_note"] = ref.get("note")
        rows.append(row)
    return _typed(pd.DataFrame(rows, columns=COLUMNS))


def _typed(df: pd.DataFrame) -> pd.DataFrame:
    """The dtypes of :func:`results_table`: text as "string", counts as "Int64", the
    rest float (so that the table survives a CSV round trip, see :func:`read_results`)."""
    df = df.copy()
    for col in df.columns:
        if col not in COLUMNS:
            continue
        if col in TEXT_COLUMNS:
            df[col] = df[col].astype("string")
        elif col in ("stage", "n", "study_queries"):
            df[col] = df[col].astype("Float64").round().astype("Int64")
        else:
            df[col] = df[col].astype(float)
    return df.reset_index(drop=True)


def seeds_table(metrics: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """One row per (experiment, seed) with that run's raw numbers; columns
    :data:`SEED_COLUMNS`, rows in the order of :func:`results_table`, seeds ascending.

    ``fidelity_gain`` / ``random_gain`` here are the run's fidelity minus that of the
    same seed of the control / of the random baseline (NaN where that seed is missing).
    """
    groups = _group(metrics)
    links = _links(groups)
    rows = []
    for name in links.order:
        for seed, m in groups[name].items():
            row = {c: m.get(c) for c in SEED_COLUMNS}
            row["seed"] = seed
            row["control"], row["baseline"] = links.control[name], links.baseline[name]
            for gain, other in (("fidelity_gain", row["control"]),
                                ("random_gain", row["baseline"])):
                theirs = groups.get(other, {}).get(seed) if other else None
                row[gain] = (_num(m.get("fidelity")) - _num(theirs.get("fidelity"))
                             if theirs is not None else math.nan)
            rows.append(row)
    df = pd.DataFrame(rows, columns=SEED_COLUMNS)
    for col in ("stage", "seed"):
        df[col] = df[col].astype("Int64")
    df["queries"] = df["queries"].astype("Float64").round().astype("Int64")
    df["dawn_verified"] = df["dawn_verified"].astype("boolean")
    return df


def read_results(path: str | Path) -> pd.DataFrame:
    """``table.csv`` (a path or an open file) read back with the dtypes
    :func:`results_table` gives (``seeds`` as text: "0", not 0)."""
    return _typed(pd.read_csv(path, dtype={c: "string" for c in TEXT_COLUMNS}))


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


PM = "±"


def _spread(text: str, sd_text: str | None, unit: str = "") -> str:
    """"84.12 ± 0.35%": the mean's text with the sd's, if any, and one unit."""
    return f"{text}{unit}" if sd_text is None else f"{text} {PM} {sd_text}{unit}"


def pct(v: Any, sd: Any = None) -> str:
    """A fraction in percent, "84.12%"; with an sd "84.12 ± 0.35%"."""
    if _missing(v):
        return DASH
    return _spread(f"{100 * float(v):.2f}", None if _missing(sd) else f"{100 * float(sd):.2f}",
                   "%")


def pp(v: Any, sd: Any = None) -> str:
    """A difference of fractions in percentage points, "+5.00 pp" / "+5.00 ± 0.40 pp"."""
    if _missing(v):
        return DASH
    return _spread(f"{100 * float(v):+.2f}",
                   None if _missing(sd) else f"{100 * float(sd):.2f}", " pp")


def _int_text(v: float, sign: bool = False) -> str:
    v = float(v)
    if v.is_integer():
        return f"{int(v):+,}" if sign else f"{int(v):,}"
    return f"{v:+,.1f}" if sign else f"{v:,.1f}"


def count(v: Any, sign: bool = False, sd: Any = None) -> str:
    """A count ("1,250"; a mean that is not whole: "1,250.5"); ± sd only when the
    seeds' counts differ (sd > 0)."""
    if _missing(v):
        return DASH
    spread = None if _missing(sd) or float(sd) == 0 else _int_text(round(float(sd), 1))
    return _spread(_int_text(v, sign), spread)


def _text(v: Any) -> str:
    return DASH if _missing(v) or v == "" else str(v)


def seconds(v: Any, sd: Any = None) -> str:
    if _missing(v):
        return DASH
    return _spread(f"{float(v):.1f}", None if _missing(sd) else f"{float(sd):.1f}")


def p_value(v: Any, sd: Any = None) -> str:
    if _missing(v):
        return DASH
    return _spread(f"{float(v):.3g}", None if _missing(sd) else f"{float(sd):.3g}")


def _api(row: Mapping[str, Any], col: str = "api") -> str:
    api, name = row.get("api"), row.get("api_name")
    if _missing(name) or name in ("", api):
        return _text(api)
    return f"{name}: {_text(api)}"


def _strategy(row: Mapping[str, Any], col: str = "strategy") -> str:
    """The strategy; a random baseline names the experiment it is matched to."""
    of = row.get("baseline_of")
    text = _text(row.get(col))
    return text if _missing(of) or of == "" else f"{text} (baseline of {of})"


def _verified(row: Mapping[str, Any], col: str = "dawn_verified") -> str:
    """Seeds verified of n ("2/2"); a single run without ``n``: yes / no."""
    share, n = row.get(col), row.get("n")
    if _missing(share):
        return DASH
    if _missing(n):
        return "yes" if share else "no"
    return f"{round(float(share) * int(n))}/{int(n)}"


def _plain(fmt: Any) -> Any:
    """A formatter of one cell's value."""
    return lambda row, col: fmt(row.get(col))


def _with_spread(fmt: Any) -> Any:
    """A formatter of a mean and its ``<col>_sd`` (just the mean where there is none)."""
    return lambda row, col: fmt(row.get(col), sd=row.get(f"{col}_sd"))


#: (header, formatter(row, column)) of each displayed column; the ``OPTIONAL`` ones are
#: left out of a stage whose experiments all lack them
DISPLAY: dict[str, tuple[str, Any]] = {
    "experiment": ("experiment", _plain(_text)),
    "strategy": ("strategy", _strategy),
    "api": ("API", _api),
    "pool": ("pool", _plain(_text)),
    "n": ("n", _plain(count)),
    "queries": ("queries", _with_spread(count)),
    "test_accuracy": ("test acc.", _with_spread(pct)),
    "fidelity": ("fidelity", _with_spread(pct)),
    "fidelity_on_victim_errors": ("fid. on victim errors", _with_spread(pct)),
    "fidelity_gain": ("fid. gain over control", _with_spread(pp)),
    "random_gain": ("fid. gain over random (same budget)", _with_spread(pp)),
    "trigger_wsr": ("WSR", _with_spread(pct)),
    "trigger_wsr_nontarget": ("WSR (non-target)", _with_spread(pct)),
    "dawn_agreement": ("DAWN agreement", _with_spread(pct)),
    "dawn_p_value": ("DAWN p", _with_spread(p_value)),
    "dawn_verified": ("verified", _verified),
    "api_honest_accuracy": ("API honest acc.", _with_spread(pct)),
    "wall_time_s": ("wall time (s)", _with_spread(seconds)),
    "study_test_accuracy": ("study acc.", _plain(pct)),
    "test_accuracy_vs_study": ("Δ acc.", _plain(pp)),
    "study_fidelity": ("study fid.", _plain(pct)),
    "fidelity_vs_study": ("Δ fid.", _plain(pp)),
    "study_queries": ("study queries", _plain(count)),
    "queries_vs_study": ("Δ queries", _plain(lambda v: count(v, sign=True))),
    "study_trigger_wsr": ("study WSR", _plain(pct)),
    "trigger_wsr_vs_study": ("Δ WSR", _plain(pp)),
    "study_note": ("study note", _plain(_text)),
}
OPTIONAL = {*VERIFICATION_KEYS, "random_gain", "study_trigger_wsr", "trigger_wsr_vs_study",
            "study_note", "pool"}
#: columns shown only in these stages (and there only where measured)
STAGE_ONLY = {"trigger_wsr_nontarget": {3}}

#: the Stage-0 table: victim columns, then those it shares with :data:`DISPLAY`
VICTIM_DISPLAY: dict[str, tuple[str, Any]] = {
    "victim": ("victim", _plain(_text)),
    "arch": ("arch", _plain(_text)),
    "width": ("width", _plain(_text)),
    "train_images": ("train images", _plain(count)),
    "watermark_fraction": ("trigger copies", _plain(pct)),
    **{k: DISPLAY[k] for k in ("test_accuracy", "trigger_wsr")},
    "train_time_s": ("training (s)", _plain(seconds)),
    **{k: DISPLAY[k] for k in ("study_test_accuracy", "test_accuracy_vs_study", "study_note")},
}


def _format(df: pd.DataFrame, spec: Mapping[str, tuple[str, Any]],
            drop: set[str] = frozenset()) -> pd.DataFrame:
    records = df.to_dict("records")
    out = {}
    for col, (header, fmt) in spec.items():
        if col in drop and all(_missing(v) for v in df[col]):
            continue
        out[header] = [fmt(r, col) for r in records]
    return pd.DataFrame(out, columns=list(out))


def display_sections(df: pd.DataFrame) -> list[tuple[int, str, pd.DataFrame]]:
    """Per stage: (stage, heading, table of display strings). Stage-3 columns appear only
    in stages whose experiments have them (``WSR (non-target)`` only in Stage 3), the
    gain over random only in stages with a matched random baseline."""
    sections = []
    for stage, part in df.groupby("stage", sort=True):
        stage = int(stage)
        spec = {c: v for c, v in DISPLAY.items() if stage in STAGE_ONLY.get(c, {stage})}
        title = f"Stage {stage}: {STAGE_TITLES.get(stage, '')}".rstrip(": ")
        sections.append((stage, title, _format(part, spec, OPTIONAL)))
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
LATEX_SYMBOLS = {"Δ": r"$\Delta$", PM: r"$\pm$", DASH: "--"}


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
    notes = [f"Run: {title or 'mextract'}; data set: {dataset}. Each experiment ran once per "
             "substitute seed; a number is the mean ± sample standard deviation over its "
             "n seeds (column n; just the mean when n = 1; queries have a ± only where the "
             "seeds spent different numbers). Percentages are of the test set; fidelity = "
             "agreement with the victim's test predictions; verified = seeds whose DAWN "
             "verification succeeded, of n.",
             "fid. gain over control = mean fidelity minus that of the stage's control (true "
             "labels, zero queries); fid. gain over random (same budget) = an adaptive "
             "strategy's mean fidelity minus that of its random baseline (the row below it, "
             "'baseline of'), which spends the same queries on uniformly random inputs. A "
             "gain has a ± where both experiments ran the same seeds: the sd of the per-seed "
             "differences.",
             "WSR = share of all stamped test images classified as the trigger's target; "
             "WSR (non-target) = the same over the images whose true class is not the "
             "target. Δ = our mean minus the study's, in percentage points (queries: in "
             "queries)."]
    if dataset != ref_data:
        notes.append(f"The study's columns are its {ref_data} numbers "
                     "(../shared/reference/study.md); this run uses another data set, so "
                     "the differences are not a reproduction check.")
    return notes
