"""Timings of a workflow run, from its own files (torch-free).

* :func:`summarize` / :func:`format_summary`: one row per Snakemake ``benchmark:`` file
  (``python -m mextract.bench summarize results/benchmarks``);
* :func:`run_window` and :func:`run_summary`: when a run's jobs started and ended (the
  job headers that :func:`mextract.runtime.logged` writes into every log, and the
  logs' modification times) and how long they took, for the generated results pages
  (rule ``summarize_run``).
"""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import re
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

BENCHMARK_COLUMNS = ("s", "max_rss", "cpu_time", "mean_load")


def summarize(root: str | Path) -> Any:
    """One row per Snakemake benchmark file under ``root`` (rule / wildcards from its
    path): wall seconds ``s``, CPU seconds ``cpu_time``, max RSS in MB ``max_rss`` and
    ``mean_load`` (Snakemake's name for the job's CPU use, cpu_time / s in percent),
    as a DataFrame sorted by seconds. Files with several repeats give their mean."""
    root = Path(root)
    rows = []
    for path in sorted(root.rglob("*.tsv")):
        df = pd.read_csv(path, sep="\t", na_values=["-", "NA"])
        if df.empty:
            continue
        rel = path.relative_to(root).with_suffix("")
        rule, job = (rel.parts[0], "/".join(rel.parts[1:])) if len(rel.parts) > 1 \
            else (rel.name, "")
        row = {"rule": rule, "job": job}
        for col in BENCHMARK_COLUMNS:
            row[col] = float(pd.to_numeric(df[col], errors="coerce").mean()) \
                if col in df else float("nan")
        rows.append(row)
    table = pd.DataFrame(rows, columns=["rule", "job", *BENCHMARK_COLUMNS])
    return table.sort_values("s", ascending=False, ignore_index=True)


def format_summary(table: Any) -> str:
    if table.empty:
        return "no benchmark files found"
    lines = ["| rule | job | wall s | CPU s | max RSS MB | CPU use % |",
             "|---|---|---:|---:|---:|---:|"]
    for r in table.itertuples():
        lines.append(f"| {r.rule} | {r.job} | {r.s:.1f} | {r.cpu_time:.1f} | "
                     f"{r.max_rss:.0f} | {r.mean_load:.1f} |")
    lines.append(f"| **total** | {len(table)} jobs | {table['s'].sum():.1f} | "
                 f"{table['cpu_time'].sum():.1f} | {table['max_rss'].max():.0f} (max) | |")
    return "\n".join(lines)


_START = re.compile(r"# mextract job: .*?start=(\S+)")


def run_window(logs: str | Path) -> dict[str, Any]:
    """First job start and last job end of the run whose job logs lie under ``logs``
    (``results/logs``): starts from each log's job header, ends from the logs'
    modification times. A run resumed in several sessions spans the pauses too."""
    starts, ends = [], []
    for path in Path(logs).rglob("*.log"):
        found = _START.findall(path.read_text(errors="replace"))
        if found:
            starts += [datetime.datetime.fromisoformat(s) for s in found]
            ends.append(datetime.datetime.fromtimestamp(path.stat().st_mtime))
    if not starts:
        return {"first_start": None, "last_end": None, "span_s": None}
    first, last = min(starts), max(ends)
    return {"first_start": first.isoformat(timespec="seconds"),
            "last_end": last.isoformat(timespec="seconds"),
            "span_s": round((last - first).total_seconds(), 1)}


def machine_description(cpuinfo: str | Path = "/proc/cpuinfo") -> str:
    """The machine this runs on, in one line (torch-free): CPU model, the cores this
    process may use, whether the CPU has bf16 instructions (CPU training runs under
    bf16 autocast only where it has), the GPUs ``nvidia-smi`` lists, the torch
    version. Speeds differ several-fold between CPUs, so a results page names its
    machine."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and value.strip():
            model = value.strip()
        elif key.strip() == "flags":
            flags = set(value.split())
        if model and flags:
            break
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 0
    bf16 = sorted(flags & {"avx512_bf16", "amx_bf16"})
    parts = [f"{model}, {cores} cores",
             "bf16 instructions: " + (", ".join(bf16) if bf16 else "none")]
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            gpus = subprocess.run([smi, "--query-gpu=name", "--format=csv,noheader"],
                                  capture_output=True, text=True, timeout=20).stdout
        except (OSError, subprocess.SubprocessError):
            gpus = ""
        if gpus.strip():
            parts.append("GPUs: " + ", ".join(g.strip() for g in gpus.splitlines()
                                               if g.strip()))
    try:
        parts.append("torch " + importlib.metadata.version("torch"))
    except importlib.metadata.PackageNotFoundError:
        pass
    return "; ".join(parts)


def _hms(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min {seconds % 60:02d} s"


def run_summary(title: str, command: str, table_md: str, benchmarks: str | Path,
                logs: str | Path, notes: Sequence[str] = ()) -> str:
    """A results page: what was run (``command``), when and how long, then the results
    tables (``table_md``, as written by the workflow)."""
    jobs = summarize(benchmarks)
    window = run_window(logs)
    busy = float(jobs["s"].sum()) if len(jobs) else 0.0
    lines = [f"# Results: {title}", "",
             "Generated by the workflow (rule `summarize_run`, or `summarize_study` for "
             "the study's table alone; mextract.timings) from the run's metrics, logs and "
             "benchmark files; not edited by hand.", "",
             "Command:", "", "```bash", command, "```", ""]
    if window["span_s"] is not None:
        lines += [f"* Jobs: {len(jobs)}; the sum of their wall times: {_hms(busy)} "
                  f"(each job's benchmark file; jobs that ran at the same time add up).",
                  f"* First job started {window['first_start']}, last job ended "
                  f"{window['last_end']}: {_hms(window['span_s'])} (includes any pause "
                  "between resumed sessions).", ""]
    lines += [*notes, *([""] if notes else []), table_md.rstrip(), ""]
    return "\n".join(lines)
