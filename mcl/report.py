"""`python -m mcl.report MULTIRUN_DIR`: one table and three plots from a Hydra sweep.

Every job of a sweep (`python -m mcl.train -m ...`) leaves in its own subdirectory:
`.hydra/overrides.yaml` (what the job changed), `metrics.csv` (csv logger) and `job.json`,
written by `JobStatusFile` (a Hydra callback, conf/hydra/default.yaml) when the job starts and
ends: status running / completed / failed, and the error of a failed job.

The report groups the completed jobs by the swept values (every override that differs
between jobs, except the ones averaged over: `seed`), and writes into the sweep dir:
- `report.md`: mean ± sample std over seeds of the final monitors (and the final `mining/*`
  diagnostics), and the jobs that failed, are unfinished or never started;
- `report.json`: the same numbers, for scripts and notebooks;
- `accuracy.png` (final accuracy per group, every seed a dot), `knn_over_epochs.png`
  (`val/knn_top1` per epoch, mean and std band), `diagnostics.png` (each `mining/*` metric
  per epoch). A metric's value at an epoch is the mean of what was logged in that epoch; its
  final value is the one of the last epoch.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import math
import os
import sys
import traceback
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from matplotlib.figure import Figure
from omegaconf import DictConfig, OmegaConf

STATUS_FILE = "job.json"
ACCURACY = ("val/knn_top1", "val/knn_top5", "val/linear_top1")


# --- written by every job -------------------------------------------------------------------
class JobStatusFile(Callback):
    """Hydra callback: `job.json` in the job's output dir (running, then completed or failed).

    A failed job does not stop a sweep (Hydra's basic sweeper runs the whole batch and raises
    the first error at the end); this file keeps the error next to the job, for the report.
    Only the process of global rank 0 writes it (not the DDP processes Lightning, torchrun or srun start).
    """

    def _write(self, config: DictConfig, **fields: Any) -> None:
        if any(int(os.environ.get(rank, 0)) for rank in ("LOCAL_RANK", "NODE_RANK", "RANK", "SLURM_PROCID")):
            return  # a process of rank > 0: started by Lightning, torchrun or srun
        out = Path(config.hydra.runtime.output_dir)
        record = {"overrides": list(config.hydra.overrides.task), "num": config.hydra.job.get("num"), **fields}
        (out / STATUS_FILE).write_text(json.dumps(record, indent=2))

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        print(f"mcl: sweep dir {config.hydra.sweep.dir}; when it ends: python -m mcl.report {config.hydra.sweep.dir}")

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._started = datetime.now()
        self._write(config, status="running", started=self._started.isoformat(timespec="seconds"))

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        ended = datetime.now()
        fields: dict[str, Any] = {
            "status": "completed" if job_return.status == JobStatus.COMPLETED else "failed",
            "started": self._started.isoformat(timespec="seconds"),
            "ended": ended.isoformat(timespec="seconds"),
            "seconds": round((ended - self._started).total_seconds(), 1),
        }
        if job_return.status == JobStatus.FAILED:
            err = job_return._return_value  # the exception; `.return_value` would re-raise it
            fields["error"] = f"{type(err).__name__}: {err}"
            fields["traceback"] = "".join(traceback.format_exception(err))
            if config.hydra.job.get("num") is not None:  # a single run: Hydra prints the error itself
                print(f"mcl: job {config.hydra.job.num} failed ({fields['error']}); the sweep goes on", file=sys.stderr)
        self._write(config, **fields)


# --- read back --------------------------------------------------------------------------------
@dataclass
class Job:
    """One job of a sweep. history: metric -> {epoch: value}; final: metric -> last epoch's value."""

    num: int
    dir: Path
    overrides: list[str]
    status: str  # completed | failed | running (unfinished) | not started
    error: str | None = None
    history: dict[str, dict[int, float]] = field(default_factory=dict)

    @property
    def final(self) -> dict[str, float]:
        return {name: by_epoch[max(by_epoch)] for name, by_epoch in self.history.items() if by_epoch}

    def value(self, key: str) -> str | None:
        """The value this job gave an override key (`mining.positive` -> `soft`), or None."""
        for override in self.overrides:
            k, _, v = override.partition("=")
            if k.lstrip("+~") == key:
                return v
        return None


def read_metrics(path: Path) -> dict[str, dict[int, float]]:
    """metrics.csv -> metric -> {epoch: mean of the values logged in that epoch}.

    A metric logged both per step and per epoch (`x_step`, `x_epoch`) is read from `x_epoch`
    and named `x`. Rows without an epoch (the lr monitor's) are skipped.
    """
    if not path.exists():
        return {}
    with path.open() as f:
        rows = list(csv.DictReader(f))
    columns = [c for c in (rows[0].keys() if rows else []) if c not in ("epoch", "step")]
    sums: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for col in columns:
        if col.endswith("_step") and col[: -len("_step")] + "_epoch" in columns:
            continue
        name = col[: -len("_epoch")] if col.endswith("_epoch") else col
        for row in rows:
            if row.get("epoch") and row.get(col):
                sums[name][int(float(row["epoch"]))].append(float(row[col]))
    return {name: {e: float(np.mean(v)) for e, v in sorted(by_epoch.items())} for name, by_epoch in sums.items()}


def expand_grid(params: dict[str, str], task_overrides: list[str]) -> list[list[str]]:
    """The overrides of every job of a sweep, in launch order: what Hydra's basic sweeper does
    with its params and the command line (a cartesian product, later keys varying fastest)."""
    parsed = OverridesParser.create().parse_overrides([*(f"{k}={v}" for k, v in params.items()), *task_overrides])
    choices: dict[str, list[str]] = {}
    for o in parsed:
        key = o.get_key_element()
        values = list(o.sweep_string_iterator()) if o.is_sweep_override() else [o.get_value_element_as_str()]
        choices[key] = [f"{key}={v}" for v in values]
    return [list(job) for job in itertools.product(*choices.values())]


def expected_jobs(sweep_dir: Path) -> list[list[str]]:
    """The overrides of every job the sweep planned (job i runs in subdir i), from its multirun.yaml."""
    path = sweep_dir / "multirun.yaml"
    if not path.exists():
        return []
    cfg = OmegaConf.load(path)
    return expand_grid(dict(OmegaConf.select(cfg, "hydra.sweeper.params") or {}), list(OmegaConf.select(cfg, "hydra.overrides.task")))


def load_sweep(sweep_dir: str | Path) -> list[Job]:
    """Every job of a multirun dir, planned or run, with its status and metrics."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"{sweep_dir} is not a directory (expected a multirun dir of `python -m mcl.train -m ...`)")
    jobs: dict[int, Job] = {}
    for overrides_file in sorted(sweep_dir.glob("*/.hydra/overrides.yaml")):
        job_dir = overrides_file.parent.parent
        if not job_dir.name.isdigit():
            continue
        status_file = job_dir / STATUS_FILE
        status = json.loads(status_file.read_text()) if status_file.exists() else {"status": "running"}
        jobs[int(job_dir.name)] = Job(
            num=int(job_dir.name),
            dir=job_dir,
            overrides=[str(o) for o in OmegaConf.load(overrides_file)],
            status=status["status"],
            error=status.get("error"),
            history=read_metrics(job_dir / "metrics.csv"),
        )
    for num, overrides in enumerate(expected_jobs(sweep_dir)):
        if num not in jobs:
            jobs[num] = Job(num=num, dir=sweep_dir / str(num), overrides=overrides, status="not started")
    if not jobs:
        raise FileNotFoundError(f"{sweep_dir} holds no jobs (no */.hydra/overrides.yaml and no multirun.yaml)")
    return [jobs[n] for n in sorted(jobs)]


# --- group and summarise ----------------------------------------------------------------------
@dataclass
class Group:
    """The jobs that share the swept values `values` (key -> value), over seeds."""

    values: dict[str, str]
    jobs: list[Job]

    @property
    def label(self) -> str:
        return ", ".join(self.values.values()) or "all jobs"

    @property
    def completed(self) -> list[Job]:
        return [j for j in self.jobs if j.status == "completed"]

    def stats(self, metric: str) -> tuple[float, float, int]:
        """Mean, sample std (nan for one run) and count of the completed runs' final values."""
        values = [j.final[metric] for j in self.completed if metric in j.final]
        if not values:
            return math.nan, math.nan, 0
        return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else math.nan, len(values)


def swept_keys(jobs: list[Job], average_over: tuple[str, ...] = ("seed",)) -> list[str]:
    """Override keys whose value differs between jobs, in the order they were given."""
    keys: list[str] = []
    for job in jobs:
        for override in job.overrides:
            key = override.partition("=")[0].lstrip("+~")
            if key not in keys and key not in average_over:
                keys.append(key)
    return [k for k in keys if len({j.value(k) for j in jobs}) > 1]


def group_jobs(jobs: list[Job], average_over: tuple[str, ...] = ("seed",)) -> list[Group]:
    """Jobs grouped by their swept values, groups in launch order."""
    keys = swept_keys(jobs, average_over)
    groups: dict[tuple, Group] = {}
    for job in jobs:
        values = {k: str(job.value(k)) for k in keys}
        groups.setdefault(tuple(values.values()), Group(values, [])).jobs.append(job)
    return list(groups.values())


def metrics_of(groups: list[Group], prefix: str = "") -> list[str]:
    """Metric names with a final value in some completed job, monitors first."""
    names = sorted({m for g in groups for j in g.completed for m in j.final if m.startswith(prefix)})
    return sorted(names, key=lambda m: (m not in ACCURACY, ACCURACY.index(m) if m in ACCURACY else 0, m))


def _cell(mean: float, std: float) -> str:
    if math.isnan(mean):
        return "-"
    return f"{mean:.4f}" if math.isnan(std) else f"{mean:.4f} ± {std:.4f}"


def _table(groups: list[Group], metrics: list[str]) -> list[str]:
    keys = list(groups[0].values)
    head = [*(keys or ["group"]), "runs", *metrics]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for g in groups:
        cells = [*(g.values.values() if keys else [g.label]), f"{len(g.completed)}/{len(g.jobs)}"]
        cells += [_cell(*g.stats(m)[:2]) for m in metrics]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def markdown(sweep_dir: Path, jobs: list[Job], groups: list[Group], plots: list[str]) -> str:
    """The report: results table, diagnostics table, problem jobs, plots."""
    monitors = [m for m in metrics_of(groups) if m.startswith("val/")]
    diagnostics = metrics_of(groups, "mining/")
    counts = {s: sum(j.status == s for j in jobs) for s in ("completed", "failed", "running", "not started")}
    lines = [
        f"# Sweep report: {sweep_dir}",
        "",
        f"{len(jobs)} jobs: {counts['completed']} completed, {counts['failed']} failed, "
        f"{counts['running']} unfinished, {counts['not started']} not started. "
        "Cells: mean ± sample std over the completed runs of a group (final epoch); runs: completed / planned.",
        "",
        "## Results",
        "",
        *_table(groups, monitors),
        *([] if monitors else ["", "No completed job logged a `val/*` monitor (runs without the csv logger have no metrics.csv)."]),
        "",
    ]
    if diagnostics:
        lines += ["## Mining diagnostics (final epoch)", "", *_table(groups, diagnostics), ""]
    problems = [j for j in jobs if j.status != "completed"]
    if problems:
        varying = swept_keys(jobs, average_over=())
        lines += ["## Failed and unfinished jobs", "", "| job | status | swept values | error |", "|---|---|---|---|"]
        for j in problems:
            values = " ".join(f"{k}={j.value(k)}" for k in varying) or " ".join(j.overrides)
            error = j.error.splitlines()[0] if j.error else ("still running, or killed" if j.status == "running" else "")
            lines.append(f"| {j.num} | {j.status} | `{values}` | {error.replace('|', '/')} |")
        lines.append("")
    if plots:
        lines += ["## Plots", "", *[f"![{p}]({p})" for p in plots], ""]
    return "\n".join(lines)


def summary(groups: list[Group]) -> list[dict[str, Any]]:
    """report.json: per group, the swept values, job counts and mean/std/n of every final metric."""
    out = []
    for g in groups:
        stats = {m: dict(zip(("mean", "std", "n"), g.stats(m))) for m in metrics_of([g])}
        out.append(
            {
                "values": g.values,
                "jobs": [j.num for j in g.jobs],
                "completed": [j.num for j in g.completed],
                "status": {j.num: j.status for j in g.jobs},
                "metrics": {
                    m: {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in s.items()} for m, s in stats.items()
                },
            }
        )
    return out


# --- plots --------------------------------------------------------------------------------
def plot_accuracy(groups: list[Group], metrics: tuple[str, ...] = ("val/knn_top1", "val/linear_top1")) -> Figure | None:
    """Final accuracy per group: bars at the mean, error bars one std, a dot per seed."""
    groups = [g for g in groups if g.completed]
    metrics = tuple(m for m in metrics if any(m in j.final for g in groups for j in g.completed))
    if not metrics:
        return None
    fig = Figure(figsize=(max(5.0, 1.2 * len(groups) * len(metrics)), 3.8), layout="constrained")
    ax = fig.subplots()
    width = 0.8 / len(metrics)
    for i, metric in enumerate(metrics):
        x = np.arange(len(groups)) + (i - (len(metrics) - 1) / 2) * width
        stats = [g.stats(metric) for g in groups]
        ax.bar(x, [s[0] for s in stats], width, yerr=[0 if math.isnan(s[1]) else s[1] for s in stats], capsize=3, label=metric, alpha=0.8)
        for xi, g in zip(x, groups):
            seeds = [j.final[metric] for j in g.completed if metric in j.final]
            ax.scatter([xi] * len(seeds), seeds, color="black", s=10, zorder=3)
    ax.set_xticks(np.arange(len(groups)), [g.label for g in groups], rotation=20, ha="right")
    ax.set_ylabel("final value")
    ax.set_title("mean ± std over seeds; a dot per run", fontsize="medium")
    ax.legend(fontsize="small")
    return fig


def _plot_history(ax, groups: list[Group], metric: str) -> bool:
    drawn = False
    for colour, g in enumerate(groups):  # a group keeps its colour C<i> in every panel
        curves = [j.history[metric] for j in g.completed if metric in j.history]
        epochs = sorted({e for c in curves for e in c})
        if not epochs:
            continue
        values = np.array([[c.get(e, np.nan) for e in epochs] for c in curves])  # runs x epochs
        mean = np.nanmean(values, axis=0)
        std = np.nanstd(values, axis=0, ddof=1) if len(curves) > 1 else np.zeros_like(mean)
        ax.plot(epochs, mean, marker="o", markersize=3, color=f"C{colour}", label=f"{g.label} (n={len(curves)})")
        ax.fill_between(epochs, mean - std, mean + std, color=f"C{colour}", alpha=0.2)
        drawn = True
    ax.set_xlabel("epoch")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_title(metric, fontsize="medium")
    return drawn


def plot_history(groups: list[Group], metric: str = "val/knn_top1") -> Figure | None:
    """One metric over epochs: a line per group (mean over seeds) with a one-std band."""
    fig = Figure(figsize=(6.0, 3.8), layout="constrained")
    ax = fig.subplots()
    if not _plot_history(ax, groups, metric):
        return None
    ax.set_title(f"{metric} (mean ± std over seeds)", fontsize="medium")
    ax.legend(fontsize="small")
    return fig


def plot_diagnostics(groups: list[Group]) -> Figure | None:
    """Every `mining/*` metric over epochs, one panel each."""
    names = metrics_of(groups, "mining/")
    if not names:
        return None
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    fig = Figure(figsize=(4.2 * cols, 3.0 * rows + 0.6), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    for ax, name in zip(axes, names):
        _plot_history(ax, groups, name)
    for ax in axes[len(names) :]:
        ax.set_axis_off()
    fig.suptitle("mining diagnostics per epoch (mean ± std over seeds)")
    legend = {label: handle for ax in axes for handle, label in zip(*ax.get_legend_handles_labels())}  # every group once
    order = [g.label for g in groups]
    labels = sorted(legend, key=lambda label: order.index(label.rsplit(" (n=", 1)[0]))
    fig.legend([legend[k] for k in labels], labels, loc="outside lower center", ncols=min(4, len(labels)), fontsize="small")
    return fig


def write_report(sweep_dir: str | Path, out: str | Path | None = None, average_over: tuple[str, ...] = ("seed",)) -> Path:
    """Write report.md, report.json and the plots into `out` (default: the sweep dir)."""
    sweep_dir = Path(sweep_dir)
    jobs = load_sweep(sweep_dir)
    out = Path(out) if out is not None else sweep_dir
    out.mkdir(parents=True, exist_ok=True)
    groups = group_jobs(jobs, average_over)
    plots = []
    for name, fig in (
        ("accuracy.png", plot_accuracy(groups)),
        ("knn_over_epochs.png", plot_history(groups, "val/knn_top1")),
        ("diagnostics.png", plot_diagnostics(groups)),
    ):
        if fig is not None:
            fig.savefig(out / name, dpi=120)
            plots.append(name)
    (out / "report.md").write_text(markdown(sweep_dir, jobs, groups, plots))
    (out / "report.json").write_text(json.dumps({"groups": summary(groups), "plots": plots}, indent=2))
    return out / "report.md"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mcl.report", description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", help="a multirun dir of `python -m mcl.train -m ...` (multirun/<task_name>/<date_time>)")
    parser.add_argument("--out", default=None, help="write the report here instead of into the sweep dir")
    parser.add_argument("--average-over", nargs="*", default=["seed"], help="override keys averaged over (default: seed)")
    args = parser.parse_args(argv)
    try:
        path = write_report(args.sweep_dir, args.out, tuple(args.average_over))
    except FileNotFoundError as err:
        parser.exit(2, f"mcl.report: {err}\n")
    print(path.read_text())
    print(f"written: {path} (and report.json, plots) in {path.parent}")


if __name__ == "__main__":
    main()
