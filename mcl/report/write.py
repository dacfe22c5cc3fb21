"""report.md and report.json: the document (setting, tables, problem jobs, plots) and the numbers as logged,
written with the figures into one dir."""

from __future__ import annotations

import json
import math
from datetime import datetime
from pathlib import Path
from typing import Any

from mcl.report.groups import DEFAULT, Group, Setting, group_jobs, plural, setting_of, swept_keys
from mcl.report.metrics import accuracy_metrics, is_count, metrics_of, results_metrics
from mcl.report.plots import figures
from mcl.report.publications import published_rows
from mcl.report.runs import Job, load_runs
from mcl.report.stats import choose_baseline, paired_rows
from mcl.report.tables import count_table, paired_lines, published_lines, results_table


def markdown(
    title: str,
    jobs: list[Job],
    groups: list[Group],
    plots: list[str],
    average_over: tuple[str, ...] = ("seed",),
    metrics: list[str] | None = None,
    baseline: str | None = None,
    setting: Setting | None = None,
) -> str:
    """The report: setting, results table, published figures, paired differences, diagnostics, counts, problem jobs, plots."""
    table_metrics = results_metrics(groups, metrics)
    diagnostics = [m for m in metrics_of(groups, "mining/") if not is_count(m)]
    counts = [m for m in metrics_of(groups, ("val/", "eval/", "mining/")) if is_count(m)]
    status = {s: sum(j.status == s for j in jobs) for s in ("completed", "failed", "running", "not started")}
    setting = setting or setting_of(jobs, average_over)
    lines = [
        f"# Report: {setting.title or title}",
        "",
        f"**{setting.words}**" + (f"; fixed overrides: `{' '.join(setting.fixed)}`" if setting.fixed else ""),
        "",
        f"{plural(len(jobs), 'job')}: {status['completed']} completed, {status['failed']} failed, "
        f"{status['running']} unfinished, {status['not started']} not started. "
        f"Cells: mean ± sample std over the completed runs of a group (final epoch; averaged over: "
        f"{', '.join(average_over) or 'nothing'}); runs: completed / planned. Epochs are counted from 1 (epoch 1: after the first).",
        "",
        "## Results",
        "",
        *results_table(groups, table_metrics),
        *([] if table_metrics else ["", "No completed job logged a `val/*` monitor (runs without the csv logger have no metrics.csv)."]),
        "",
    ]
    if any(m.startswith("eval/") for m in table_metrics):
        lines += [
            "Offline evaluations (`python -m mcl.eval.sweep`) of each job's last checkpoint: 200-NN is the k=200, t=0.1 cell of "
            "the kNN grid; linear gives the final epoch and the best test epoch (the lab's Acc-1-Best, picked on the test split).",
            "",
        ]
    lines += published_lines(groups)
    acc = accuracy_metrics(groups, metrics)
    if len(groups) > 1 and acc:
        lines += paired_lines(groups, acc, baseline)
    if diagnostics:
        lines += ["## Mining diagnostics (final epoch)", "", *results_table(groups, diagnostics), ""]
    if counts:
        lines += ["## Counts (final epoch)", "", *count_table(groups, counts), ""]
    problems = [j for j in jobs if j.status != "completed"]
    if problems:
        varying = swept_keys(jobs, average_over=())
        lines += ["## Failed and unfinished jobs", "", "| job | status | swept values | error |", "|---|---|---|---|"]
        for j in problems:
            values = " ".join(f"{k}={j.value(k, DEFAULT)}" for k in varying) or " ".join(j.overrides)
            error = j.error.splitlines()[0] if j.error else ("still running, or killed" if j.status == "running" else "")
            lines.append(f"| {j.name} | {j.status} | `{values}` | {error.replace('|', '/')} |")
        lines.append("")
    if plots:
        lines += ["## Plots", ""]
        for png in plots:
            stem = Path(png).with_suffix("")
            lines += [f"![{png}]({png})", f"(vector: [{stem}.svg]({stem}.svg), [{stem}.pdf]({stem}.pdf))", ""]
    return "\n".join(lines)


def _clean(x: Any) -> Any:
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_clean(v) for v in x]
    return x


def summary(groups: list[Group]) -> list[dict[str, Any]]:
    """report.json: per group, the swept values, job counts and mean/std/n of every final metric (as logged: shares in [0, 1])."""
    out = []
    for g in groups:
        stats = {m: dict(zip(("mean", "std", "n"), g.stats(m))) for m in metrics_of([g])}
        out.append(
            {
                "label": g.label,
                "values": g.values,
                "jobs": [j.name for j in g.jobs],
                "completed": [j.name for j in g.completed],
                "status": {j.name: j.status for j in g.jobs},
                "metrics": _clean(stats),
            }
        )
    return out


def write_report(
    dirs: str | Path | list[str | Path],
    out: str | Path | None = None,
    average_over: tuple[str, ...] = ("seed",),
    title: str | None = None,
    metrics: list[str] | None = None,
    labels: dict[str, str] | None = None,
    baseline: str | None = None,
) -> Path:
    """Write report.md, report.json and the plots (PNG, SVG and PDF) into `out` (default: the one dir
    given; with several, reports/<date_time> under the working directory)."""
    dirs = [dirs] if isinstance(dirs, (str, Path)) else list(dirs)
    jobs = load_runs(*dirs)
    groups = group_jobs(jobs, average_over, labels)
    setting = setting_of(jobs, average_over, title)
    if metrics:
        results_metrics(groups, metrics)  # unknown names fail before anything is written
    if len(groups) > 1:
        choose_baseline(groups, baseline)
    if out is None:
        out = Path(dirs[0]) if len(dirs) == 1 else Path("reports") / datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plots = []
    for name, fig in figures(groups, setting, metrics).items():
        if fig is not None:
            for suffix in ("png", "svg", "pdf"):
                fig.savefig(out / f"{name}.{suffix}", dpi=150)
            plots.append(f"{name}.png")
    (out / "report.md").write_text(markdown(", ".join(map(str, dirs)), jobs, groups, plots, average_over, metrics, baseline, setting))
    acc = accuracy_metrics(groups, metrics)
    paired = paired_rows(groups, acc, baseline) if len(groups) > 1 and acc else []
    report = {
        "dirs": [str(d) for d in dirs],
        "setting": vars(setting) | {"average_over": list(average_over)},
        "groups": summary(groups),
        "published": _clean(published_rows(groups)),
        "paired": _clean(paired),
    }
    vector = [str(Path(p).with_suffix(s)) for p in plots for s in (".svg", ".pdf")]
    (out / "report.json").write_text(json.dumps({**report, "plots": plots, "vector_plots": vector}, indent=2))
    return out / "report.md"
