"""`python -m mcl.report DIR [DIR ...]`: one table and three plots from sweeps and runs.

DIR is a Hydra sweep (`python -m mcl.train -m ...`: multirun/<task>/<date_time>), a single run
dir (outputs/<task>/<date_time>) or a folder of them (outputs/<task>, outputs/); several DIRs
are compared as one set of runs. Every run leaves `.hydra/overrides.yaml` (what it changed),
`metrics.csv` (csv logger), its config and `job.json`, written by `JobStatusFile` (a Hydra
callback, conf/hydra/default.yaml) when it starts and ends: status running / completed /
failed, and the error of a failed job.

The report groups the completed runs by the swept values (every override that differs between
runs, except the ones averaged over: `seed`; a run without an override another run sets reads
`default`), and writes into the one DIR given (with several: reports/<date_time>, or `--out`):
- `report.md`: the dataset, epochs and overrides every run shared; mean ± sample std over
  seeds of the final monitors (and the final `mining/*` diagnostics), shares in percent; and
  the jobs that failed, are unfinished or never started;
- `report.json`: the same numbers as logged (shares in [0, 1]), for scripts and notebooks;
- `accuracy`, `knn_over_epochs`, `diagnostics` as .png and .svg: final accuracy per group
  (every seed a dot), kNN top-1 per epoch (mean and std band), each `mining/*` metric per
  epoch; titled with the dataset, epochs and shared overrides, metrics named in words. A
  metric's value at an epoch is the mean of what was logged in that epoch; its final value is
  the one of the last epoch.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import math
import os
import sys
import textwrap
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
    """One run: a job of a sweep or a single run dir. history: metric -> {epoch: value}; final:
    metric -> last epoch's value. name: its dir relative to the dirs reported on (`3` in a sweep).
    dataset, max_epochs: from its config (None when unreadable)."""

    num: int | None
    dir: Path
    overrides: list[str]
    status: str  # completed | failed | running (unfinished) | not started
    error: str | None = None
    history: dict[str, dict[int, float]] = field(default_factory=dict)
    name: str = ""
    dataset: str | None = None
    max_epochs: int | None = None

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


def run_setting(run_dir: Path) -> tuple[str | None, int | None]:
    """(dataset name, trainer.max_epochs) of a run, from the config it saved (resolved first)."""
    for name in ("config_resolved.yaml", ".hydra/config.yaml"):
        path = run_dir / name
        if path.is_file():
            cfg = OmegaConf.load(path)
            dataset = OmegaConf.select(cfg, "dataset.name", throw_on_resolution_failure=False)
            epochs = OmegaConf.select(cfg, "trainer.max_epochs", throw_on_resolution_failure=False)
            return (str(dataset) if dataset is not None else None), (int(epochs) if isinstance(epochs, int) else None)
    return None, None


def _read_job(run_dir: Path, name: str, num: int | None) -> Job:
    status_file = run_dir / STATUS_FILE
    status = json.loads(status_file.read_text()) if status_file.exists() else {"status": "running"}
    dataset, max_epochs = run_setting(run_dir)
    return Job(
        num=num,
        dir=run_dir,
        overrides=[str(o) for o in OmegaConf.load(run_dir / ".hydra" / "overrides.yaml")],
        status=status["status"],
        error=status.get("error"),
        history=read_metrics(run_dir / "metrics.csv"),
        name=name,
        dataset=dataset,
        max_epochs=max_epochs,
    )


def _relative_name(path: Path, base: Path) -> str:
    return str(path.relative_to(base)) if path != base else path.name


def load_runs(*dirs: str | Path) -> list[Job]:
    """Every run at or under `dirs`: sweep dirs (multirun/<task>/<date_time>, with the jobs they
    planned but never started), single run dirs (outputs/<task>/<date_time>) and folders of them
    (outputs/<task>, outputs/). Sweep jobs come in launch order, single runs in date order."""
    roots = [Path(d) for d in dirs]
    for root in roots:
        if not root.is_dir():
            raise FileNotFoundError(f"{root} is not a directory (expected a run dir, a multirun dir, or a folder of them)")
    roots = [r.resolve() for r in roots]
    base = Path(os.path.commonpath(roots))
    jobs: dict[Path, Job] = {}
    for root in roots:
        sweeps = {m.parent for m in root.rglob("multirun.yaml")}
        for overrides_file in sorted(root.rglob(".hydra/overrides.yaml")):
            run_dir = overrides_file.parent.parent
            num = int(run_dir.name) if run_dir.parent in sweeps and run_dir.name.isdigit() else None
            jobs[run_dir] = _read_job(run_dir, _relative_name(run_dir, base), num)
        for sweep in sweeps:
            for num, overrides in enumerate(expected_jobs(sweep)):
                if sweep / str(num) not in jobs:
                    job_dir = sweep / str(num)
                    jobs[job_dir] = Job(num, job_dir, overrides, "not started", name=_relative_name(job_dir, base))
    if not jobs:
        raise FileNotFoundError(f"{', '.join(map(str, roots))} holds no jobs (no */.hydra/overrides.yaml and no multirun.yaml)")
    return sorted(jobs.values(), key=lambda j: (str(j.dir.parent), -1 if j.num is None else j.num, str(j.dir)))


# --- group and summarise ----------------------------------------------------------------------
@dataclass
class Group:
    """The jobs that share the swept values `values` (key -> value), over seeds."""

    values: dict[str, str]
    jobs: list[Job]

    @property
    def label(self) -> str:
        """For legends and axes: `negative=gradient, temperature=0.1` (the last part of each key)."""
        short = short_keys(list(self.values))
        return ", ".join(f"{short[k]}={v}" for k, v in self.values.items()) or "all runs"

    @property
    def completed(self) -> list[Job]:
        return [j for j in self.jobs if j.status == "completed"]

    def stats(self, metric: str) -> tuple[float, float, int]:
        """Mean, sample std (nan for one run) and count of the completed runs' final values."""
        values = [j.final[metric] for j in self.completed if metric in j.final]
        if not values:
            return math.nan, math.nan, 0
        return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else math.nan, len(values)


def short_keys(keys: list[str]) -> dict[str, str]:
    """Each override key by its last dotted part, or the whole key where two would read the same."""
    last = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: (s if last.count(s) == 1 else k) for k, s in zip(keys, last)}


def _key(override: str) -> str:
    return override.partition("=")[0].lstrip("+~")


def swept_keys(jobs: list[Job], average_over: tuple[str, ...] = ("seed",)) -> list[str]:
    """Override keys whose value differs between jobs, in the order they were given."""
    keys: list[str] = []
    for job in jobs:
        for key in map(_key, job.overrides):
            if key not in keys and key not in average_over:
                keys.append(key)
    return [k for k in keys if len({j.value(k) for j in jobs}) > 1]


def _value(job: Job, key: str) -> str:
    value = job.value(key)
    return "default" if value is None else value  # a separate run that left this key as its config has it


def group_jobs(jobs: list[Job], average_over: tuple[str, ...] = ("seed",)) -> list[Group]:
    """Jobs grouped by their swept values, groups in launch order."""
    keys = swept_keys(jobs, average_over)
    groups: dict[tuple, Group] = {}
    for job in jobs:
        values = {k: _value(job, k) for k in keys}
        groups.setdefault(tuple(values.values()), Group(values, [])).jobs.append(job)
    return list(groups.values())


@dataclass
class Setting:
    """What every table and plot states about the runs compared: dataset, budget, fixed overrides."""

    datasets: list[str]
    epochs: list[int]
    fixed: list[str]  # overrides every job shares (the averaged-over keys left out)
    average_over: tuple[str, ...]

    @property
    def headline(self) -> str:
        """`digits, 200 epochs` (several: `cifar10/digits, 2-200 epochs`)."""
        data = "/".join(self.datasets) or "dataset unknown"
        if not self.epochs:
            return data
        lo, hi = min(self.epochs), max(self.epochs)
        return f"{data}, {lo if lo == hi else f'{lo}-{hi}'} epoch{'' if hi == 1 else 's'}"

    def fixed_line(self, width: int = 110) -> str:
        return textwrap.fill("fixed: " + " ".join(self.fixed), width) if self.fixed else ""


def setting_of(jobs: list[Job], average_over: tuple[str, ...] = ("seed",)) -> Setting:
    ran = [j for j in jobs if j.status != "not started"] or jobs
    varying = set(swept_keys(jobs, average_over=()))
    fixed = [o for o in ran[0].overrides if _key(o) not in varying and _key(o) not in average_over]
    fixed = [o for o in fixed if all(o in j.overrides for j in jobs)]
    return Setting(
        datasets=sorted({j.dataset for j in ran if j.dataset}),
        epochs=sorted({j.max_epochs for j in ran if j.max_epochs is not None}),
        fixed=fixed,
        average_over=average_over,
    )


METRIC_NAMES = {  # metric key -> words for tables, axes and legends; "%": a share, shown in percent
    "val/knn_top1": "kNN top-1 (%)",
    "val/knn_top5": "kNN top-5 (%)",
    "val/linear_top1": "online linear top-1 (%)",
    "mining/pos_kept": "mined positives kept per query",
    "mining/pos_purity": "mined positives of the query's class (%)",
    "mining/neg_kept": "negatives kept per query",
    "mining/neg_fn_kept": "false negatives among kept (%)",
    "mining/neg_fn_dropped": "false negatives among dropped (%)",
    "mining/neg_grad_share_kept": "gradient share of kept negatives (%)",
    "mining/neg_sim_kept": "similarity of kept negatives",
    "mining/neg_sim_dropped": "similarity of dropped negatives",
}


def metric_name(metric: str) -> str:
    """`val/knn_top1` -> `kNN top-1 (%)`; an unknown metric reads as its last part in words."""
    return METRIC_NAMES.get(metric, metric.rsplit("/", 1)[-1].replace("_", " "))


def shown(metric: str, value: float) -> float:
    """The value as tables and plots show it: shares in percent."""
    return 100 * value if metric_name(metric).endswith("(%)") else value


def metrics_of(groups: list[Group], prefix: str = "") -> list[str]:
    """Metric names with a final value in some completed job, monitors first."""
    names = sorted({m for g in groups for j in g.completed for m in j.final if m.startswith(prefix)})
    return sorted(names, key=lambda m: (m not in ACCURACY, ACCURACY.index(m) if m in ACCURACY else 0, m))


def _cell(metric: str, mean: float, std: float) -> str:
    if math.isnan(mean):
        return "-"
    digits = ".2f" if metric_name(metric).endswith("(%)") else ".4g"
    mean, std = shown(metric, mean), shown(metric, std)
    return f"{mean:{digits}}" if math.isnan(std) else f"{mean:{digits}} ± {std:{digits}}"


def _table(groups: list[Group], metrics: list[str]) -> list[str]:
    keys = list(groups[0].values)
    head = [*(keys or ["group"]), "runs", *map(metric_name, metrics)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for g in groups:
        cells = [*(g.values.values() if keys else [g.label]), f"{len(g.completed)}/{len(g.jobs)}"]
        cells += [_cell(m, *g.stats(m)[:2]) for m in metrics]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def markdown(title: str, jobs: list[Job], groups: list[Group], plots: list[str], average_over: tuple[str, ...] = ("seed",)) -> str:
    """The report: setting, results table, diagnostics table, problem jobs, plots."""
    monitors = [m for m in metrics_of(groups) if m.startswith("val/")]
    diagnostics = metrics_of(groups, "mining/")
    counts = {s: sum(j.status == s for j in jobs) for s in ("completed", "failed", "running", "not started")}
    setting = setting_of(jobs, average_over)
    lines = [
        f"# Report: {title}",
        "",
        f"**{setting.headline}**" + (f"; fixed overrides: `{' '.join(setting.fixed)}`" if setting.fixed else ""),
        "",
        f"{len(jobs)} jobs: {counts['completed']} completed, {counts['failed']} failed, "
        f"{counts['running']} unfinished, {counts['not started']} not started. "
        f"Cells: mean ± sample std over the completed runs of a group (final epoch; averaged over: "
        f"{', '.join(average_over) or 'nothing'}); runs: completed / planned.",
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
            values = " ".join(f"{k}={_value(j, k)}" for k in varying) or " ".join(j.overrides)
            error = j.error.splitlines()[0] if j.error else ("still running, or killed" if j.status == "running" else "")
            lines.append(f"| {j.name} | {j.status} | `{values}` | {error.replace('|', '/')} |")
        lines.append("")
    if plots:
        lines += ["## Plots", ""]
        for png in plots:
            lines += [f"![{png}]({png})", f"(vector: [{Path(png).with_suffix('.svg')}]({Path(png).with_suffix('.svg')}))", ""]
    return "\n".join(lines)


def summary(groups: list[Group]) -> list[dict[str, Any]]:
    """report.json: per group, the swept values, job counts and mean/std/n of every final metric (as logged: shares in [0, 1])."""
    out = []
    for g in groups:
        stats = {m: dict(zip(("mean", "std", "n"), g.stats(m))) for m in metrics_of([g])}
        out.append(
            {
                "values": g.values,
                "jobs": [j.name for j in g.jobs],
                "completed": [j.name for j in g.completed],
                "status": {j.name: j.status for j in g.jobs},
                "metrics": {
                    m: {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in s.items()} for m, s in stats.items()
                },
            }
        )
    return out


# --- plots --------------------------------------------------------------------------------
def _titled(fig: Figure, what: str, setting: Setting) -> Figure:
    """A title that says what is drawn, on which dataset and budget, and what every run shared."""
    width = int(fig.get_figwidth() * 16)
    fixed = setting.fixed_line(width)
    fig.suptitle(f"{what}\n{setting.headline}" + (f"\n{fixed}" if fixed else ""), fontsize="medium")
    return fig


def plot_accuracy(groups: list[Group], setting: Setting, metrics: tuple[str, ...] = ("val/knn_top1", "val/linear_top1")) -> Figure | None:
    """Final accuracy per group: bars at the mean, error bars one std, a dot per seed."""
    groups = [g for g in groups if g.completed]
    metrics = tuple(m for m in metrics if any(m in j.final for g in groups for j in g.completed))
    if not metrics:
        return None
    fig = Figure(figsize=(max(6.0, 1.2 * len(groups) * len(metrics)), 4.4), layout="constrained")
    ax = fig.subplots()
    width = 0.8 / len(metrics)
    for i, metric in enumerate(metrics):
        x = np.arange(len(groups)) + (i - (len(metrics) - 1) / 2) * width
        stats = [g.stats(metric) for g in groups]
        errors = [0 if math.isnan(s[1]) else shown(metric, s[1]) for s in stats]
        ax.bar(x, [shown(metric, s[0]) for s in stats], width, yerr=errors, capsize=3, label=metric_name(metric), alpha=0.8)
        for xi, g in zip(x, groups):
            seeds = [shown(metric, j.final[metric]) for j in g.completed if metric in j.final]
            ax.scatter([xi] * len(seeds), seeds, color="black", s=10, zorder=3)
    ax.set_xticks(np.arange(len(groups)), [g.label for g in groups], rotation=20, ha="right")
    ax.set_ylabel("top-1 accuracy at the last epoch (%)")
    ax.legend(fontsize="small")
    return _titled(fig, "Final accuracy: mean ± std over seeds, a dot per run", setting)


def _plot_history(ax, groups: list[Group], metric: str) -> bool:
    drawn, every = False, set()
    for colour, g in enumerate(groups):  # a group keeps its colour C<i> in every panel
        curves = [j.history[metric] for j in g.completed if metric in j.history]
        epochs = sorted({e for c in curves for e in c})
        if not epochs:
            continue
        values = np.array([[shown(metric, c.get(e, np.nan)) for e in epochs] for c in curves])  # runs x epochs
        mean = np.nanmean(values, axis=0)
        std = np.nanstd(values, axis=0, ddof=1) if len(curves) > 1 else np.zeros_like(mean)
        x = np.array(epochs) + 1  # metrics.csv counts epochs from 0; a value logged in epoch e is after e + 1 epochs
        ax.plot(x, mean, marker="o", markersize=3, color=f"C{colour}", label=f"{g.label} (n={len(curves)})")
        if len(x) > 1:
            ax.fill_between(x, mean - std, mean + std, color=f"C{colour}", alpha=0.2)
        else:  # one epoch: a band would be a line; error bars
            ax.errorbar(x, mean, yerr=std, fmt="none", ecolor=f"C{colour}", capsize=4)
        drawn, every = True, every | set(x.tolist())
    if every and max(every) - min(every) < 4:  # a short run: whole epochs, with room around the points
        ax.set_xlim(min(every) - 0.5, max(every) + 0.5)
        ax.set_xticks(sorted(every))
    else:
        ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("epoch")
    ax.set_ylabel(metric_name(metric))
    return drawn


def plot_history(groups: list[Group], setting: Setting, metric: str = "val/knn_top1") -> Figure | None:
    """One metric over epochs: a line per group (mean over seeds) with a one-std band."""
    fig = Figure(figsize=(7.0, 4.4), layout="constrained")
    ax = fig.subplots()
    if not _plot_history(ax, groups, metric):
        return None
    ax.legend(fontsize="small")
    return _titled(fig, f"{metric_name(metric)} per epoch: mean ± std over seeds", setting)


def plot_diagnostics(groups: list[Group], setting: Setting) -> Figure | None:
    """Every `mining/*` metric over epochs, one panel each."""
    names = metrics_of(groups, "mining/")
    if not names:
        return None
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    fig = Figure(figsize=(max(6.5, 4.4 * cols), 3.0 * rows + 1.2), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    for ax, name in zip(axes, names):
        _plot_history(ax, groups, name)
        ax.set_title(metric_name(name), fontsize="medium")
        ax.set_ylabel("")
    for ax in axes[len(names) :]:
        ax.set_axis_off()
    legend = {label: handle for ax in axes for handle, label in zip(*ax.get_legend_handles_labels())}  # every group once
    order = [g.label for g in groups]
    labels = sorted(legend, key=lambda label: order.index(label.rsplit(" (n=", 1)[0]))
    fig.legend([legend[k] for k in labels], labels, loc="outside lower center", ncols=min(4, len(labels)), fontsize="small")
    return _titled(fig, "Mining diagnostics per epoch: mean ± std over seeds", setting)


PLOTS = ("accuracy", "knn_over_epochs", "diagnostics")  # written as <name>.png and <name>.svg


def figures(groups: list[Group], setting: Setting) -> dict[str, Figure | None]:
    return {
        "accuracy": plot_accuracy(groups, setting),
        "knn_over_epochs": plot_history(groups, setting, "val/knn_top1"),
        "diagnostics": plot_diagnostics(groups, setting),
    }


def write_report(dirs: str | Path | list[str | Path], out: str | Path | None = None, average_over: tuple[str, ...] = ("seed",)) -> Path:
    """Write report.md, report.json and the plots (PNG and SVG) into `out` (default: the one dir
    given; with several, reports/<date_time> under the working directory)."""
    dirs = [dirs] if isinstance(dirs, (str, Path)) else list(dirs)
    jobs = load_runs(*dirs)
    if out is None:
        out = Path(dirs[0]) if len(dirs) == 1 else Path("reports") / datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    groups = group_jobs(jobs, average_over)
    setting = setting_of(jobs, average_over)
    plots = []
    for name, fig in figures(groups, setting).items():
        if fig is not None:
            fig.savefig(out / f"{name}.png", dpi=150)
            fig.savefig(out / f"{name}.svg")
            plots.append(f"{name}.png")
    title = ", ".join(map(str, dirs))
    (out / "report.md").write_text(markdown(title, jobs, groups, plots, average_over))
    vector = [str(Path(p).with_suffix(".svg")) for p in plots]
    report = {"dirs": [str(d) for d in dirs], "setting": vars(setting) | {"average_over": list(average_over)}, "groups": summary(groups)}
    (out / "report.json").write_text(json.dumps({**report, "plots": plots, "vector_plots": vector}, indent=2))
    return out / "report.md"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mcl.report", description=__doc__.splitlines()[0])
    parser.add_argument(
        "dirs", nargs="+", help="sweep dirs (multirun/<task>/<date_time>), run dirs (outputs/<task>/<date_time>) or folders of them"
    )
    parser.add_argument("--out", default=None, help="write the report here (default: the one dir given; with several, reports/<date_time>)")
    parser.add_argument("--average-over", nargs="*", default=["seed"], help="override keys averaged over (default: seed)")
    args = parser.parse_args(argv)
    try:
        path = write_report(args.dirs, args.out, tuple(args.average_over))
    except FileNotFoundError as err:
        parser.exit(2, f"mcl.report: {err}\n")
    print(path.read_text())
    print(f"written: {path} (and report.json, plots as PNG and SVG) in {path.parent}")


if __name__ == "__main__":
    main()
