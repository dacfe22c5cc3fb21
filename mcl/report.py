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
- `report.md`: the dataset, budget and what varies; mean ± sample std over seeds of the final
  monitors and of the offline evaluations beside each job's last checkpoint (`mcl.eval.sweep`:
  200-NN, linear final and best test epoch), one precision per metric, shares in percent; the
  published figure (mcl/published.yaml) and our difference for a preset and dataset that has
  one, saying when the budget differs; each variant's paired difference to the baseline group
  over the seeds both ran, with a 95 % t interval; the final `mining/*` diagnostics, the counts
  apart; the jobs that failed, are unfinished or never started;
- `report.json`: the same numbers as logged (shares in [0, 1]), for scripts and notebooks;
- `accuracy`, `knn_over_epochs`, `diagnostics` as .png, .svg and .pdf: final accuracy per group
  (mean ± std, every run a dot, the axis spanning the values), kNN top-1 per epoch (mean and std
  band), each `mining/*` metric per epoch; titled in words (dataset, budget, what varies; or
  `--title`), legends outside the axes, epochs counted from 1 (after the first). A metric's value
  at an epoch is the mean of what was logged in that epoch; its final value is the one of the last epoch.
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
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from matplotlib.figure import Figure
from omegaconf import DictConfig, OmegaConf

STATUS_FILE = "job.json"


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
    """One run: a job of a sweep or a single run dir. history: metric -> {epoch: value}; evaluated:
    metric -> value of the offline evaluations beside its last checkpoint (`eval/*`); final: metric
    -> last epoch's value, and the evaluations. name: its dir relative to the dirs reported on
    (`3` in a sweep). dataset, max_epochs, seed, preset: from its config (None when unreadable)."""

    num: int | None
    dir: Path
    overrides: list[str]
    status: str  # completed | failed | running (unfinished) | not started
    error: str | None = None
    history: dict[str, dict[int, float]] = field(default_factory=dict)
    name: str = ""
    dataset: str | None = None
    max_epochs: int | None = None
    seed: int | None = None
    preset: str | None = None  # the published figures' key: the experiment preset (nnclr_k5: nnclr with topk 5)
    width: int | None = None  # backbone.width
    evaluated: dict[str, float] = field(default_factory=dict)

    @property
    def final(self) -> dict[str, float]:
        return {**{name: by_epoch[max(by_epoch)] for name, by_epoch in self.history.items() if by_epoch}, **self.evaluated}

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


@dataclass
class RunSetting:
    dataset: str | None = None
    max_epochs: int | None = None
    seed: int | None = None
    preset: str | None = None
    width: int | None = None  # backbone.width: 64 is the published ResNets'


def run_setting(run_dir: Path) -> RunSetting:
    """Dataset name, trainer.max_epochs, seed, preset and backbone width of a run, from the config it saved (resolved first).

    The preset is the experiment Hydra composed (`.hydra/hydra.yaml`), `nnclr_k5` for nnclr with
    model.neighbours.topk=5 (the lab's two NNCLR rows)."""
    setting = RunSetting()
    for name in ("config_resolved.yaml", ".hydra/config.yaml"):
        path = run_dir / name
        if path.is_file():
            cfg = OmegaConf.load(path)
            dataset, epochs, seed, topk, width = (
                OmegaConf.select(cfg, key, throw_on_resolution_failure=False)
                for key in ("dataset.name", "trainer.max_epochs", "seed", "model.neighbours.topk", "backbone.width")
            )
            setting = RunSetting(
                str(dataset) if dataset is not None else None,
                int(epochs) if isinstance(epochs, int) else None,
                int(seed) if isinstance(seed, int) else None,
                width=int(width) if isinstance(width, int) else None,
            )
            break
    else:
        return setting
    hydra_file = run_dir / ".hydra" / "hydra.yaml"
    preset = OmegaConf.select(OmegaConf.load(hydra_file), "hydra.runtime.choices.experiment") if hydra_file.is_file() else None
    if preset is None:
        overrides_file = run_dir / ".hydra" / "overrides.yaml"
        overrides = [str(o) for o in OmegaConf.load(overrides_file)] if overrides_file.is_file() else []
        preset = next((o.partition("=")[2] for o in overrides if _key(o) == "experiment"), None)
    if preset == "nnclr" and topk == 5:
        preset = "nnclr_k5"
    setting.preset = preset
    return setting


EVAL_CHECKPOINT = "checkpoints/last.ckpt"  # the checkpoint mcl.eval.sweep evaluates in every job


def read_evaluations(run_dir: Path, checkpoint: str = EVAL_CHECKPOINT) -> dict[str, float]:
    """The offline results beside a job's checkpoint (mcl.eval.knn / linear / sweep), the newest of each:
    `eval/knn200_top1` (the k=200, t=0.1 cell of the kNN grid, the lab's 200-NN), and per linear
    protocol P `eval/linear_P_top1` (final epoch) and `eval/linear_P_best_top1` (best test epoch)."""
    ckpt = run_dir / checkpoint
    found: dict[str, tuple[int, Path]] = {}  # evaluation name -> (rerun number, newest file)
    for path in ckpt.parent.glob(f"{ckpt.stem}.*.json"):
        parts = path.name[len(ckpt.stem) + 1 : -len(".json")].split(".")  # knn | linear-lab | knn.2
        what, n = parts[0], int(parts[1]) if len(parts) == 2 and parts[1].isdigit() else 1
        if (what == "knn" or what.startswith("linear-")) and len(parts) <= 2 and n >= found.get(what, (0, path))[0]:
            found[what] = (n, path)
    out: dict[str, float] = {}
    for what, (_, path) in sorted(found.items()):
        try:
            result = json.loads(path.read_text())
        except json.JSONDecodeError:
            continue  # cut short while being written
        if what == "knn":
            cell = next((r for r in result.get("grid", []) if r["k"] == 200 and math.isclose(r["t"], 0.1)), None)
            if cell is not None:
                out["eval/knn200_top1"] = cell["top1"]
        else:
            protocol = what[len("linear-") :]
            if "top1" in result:  # the final epoch's (results written before the best epoch was kept have only this)
                out[f"eval/linear_{protocol}_top1"] = result["top1"]
            if "best" in result:
                out[f"eval/linear_{protocol}_best_top1"] = result["best"]["top1"]
    return out


def _read_job(run_dir: Path, name: str, num: int | None) -> Job:
    status_file = run_dir / STATUS_FILE
    status = json.loads(status_file.read_text()) if status_file.exists() else {"status": "running"}
    setting = run_setting(run_dir)
    return Job(
        num=num,
        dir=run_dir,
        overrides=[str(o) for o in OmegaConf.load(run_dir / ".hydra" / "overrides.yaml")],
        status=status["status"],
        error=status.get("error"),
        history=read_metrics(run_dir / "metrics.csv"),
        name=name,
        dataset=setting.dataset,
        max_epochs=setting.max_epochs,
        seed=setting.seed,
        preset=setting.preset,
        width=setting.width,
        evaluated=read_evaluations(run_dir),
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
    """The jobs that share the swept values `values` (key -> value), over seeds. name: a label given
    by the user (`--labels`), shown instead of the values."""

    values: dict[str, str]
    jobs: list[Job]
    name: str | None = None

    @property
    def label(self) -> str:
        """For legends and axes: the user's name, else `negative=gradient, temperature=0.1` (the last part of each key)."""
        if self.name:
            return self.name
        short = short_keys(list(self.values))
        return ", ".join(f"{short[k]}={v}" for k, v in self.values.items()) or "all runs"

    @property
    def auto_label(self) -> str:
        return Group(self.values, self.jobs).label

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


def group_jobs(jobs: list[Job], average_over: tuple[str, ...] = ("seed",), labels: dict[str, str] | None = None) -> list[Group]:
    """Jobs grouped by their swept values, groups in launch order; `labels`: automatic label -> the name to show."""
    keys = swept_keys(jobs, average_over)
    groups: dict[tuple, Group] = {}
    for job in jobs:
        values = {k: _value(job, k) for k in keys}
        groups.setdefault(tuple(values.values()), Group(values, [])).jobs.append(job)
    labels = labels or {}
    unknown = set(labels) - {g.label for g in groups.values()}
    if unknown:
        raise ValueError(f"--labels names no group: {sorted(unknown)}; the groups are {[g.label for g in groups.values()]}")
    for g in groups.values():
        g.name = labels.get(g.label)
    return list(groups.values())


def plural(n: int, word: str) -> str:
    """`1 job`, `2 jobs`."""
    return f"{n} {word}{'' if n == 1 else 's'}"


@dataclass
class Setting:
    """What every table and plot states about the runs compared: dataset, budget, what varies, fixed overrides."""

    datasets: list[str]
    epochs: list[int]
    fixed: list[str]  # overrides every job shares (the averaged-over keys left out)
    average_over: tuple[str, ...]
    varying: list[str] = field(default_factory=list)  # the override keys that define the groups
    seeds: tuple[int, int] = (0, 0)  # the fewest and the most completed runs of a group
    title: str | None = None  # the user's (--title): replaces the words below in every heading

    @property
    def headline(self) -> str:
        """`digits, 200 epochs` (several: `cifar10/digits, 2-200 epochs`)."""
        data = "/".join(self.datasets) or "dataset unknown"
        if not self.epochs:
            return data
        lo, hi = min(self.epochs), max(self.epochs)
        return f"{data}, {lo if lo == hi else f'{lo}-{hi}'} epoch{'' if hi == 1 else 's'}"

    @property
    def words(self) -> str:
        """The figures' title: `digits, 3 epochs; varies: negative x positive; 3 seeds per variant` (or the user's)."""
        if self.title:
            return self.title
        varies = "varies: " + " x ".join(short_keys(self.varying).values()) if self.varying else "one setting"
        lo, hi = self.seeds
        seeds = "" if not hi else f"; {plural(hi, 'run') if lo == hi else f'{lo}-{hi} runs'} per variant"
        return f"{self.headline}; {varies}{seeds}"


def setting_of(jobs: list[Job], average_over: tuple[str, ...] = ("seed",), title: str | None = None) -> Setting:
    ran = [j for j in jobs if j.status != "not started"] or jobs
    varying = set(swept_keys(jobs, average_over=()))
    fixed = [o for o in ran[0].overrides if _key(o) not in varying and _key(o) not in average_over]
    fixed = [o for o in fixed if all(o in j.overrides for j in jobs)]
    groups = group_jobs(jobs, average_over)
    return Setting(
        datasets=sorted({j.dataset for j in ran if j.dataset}),
        epochs=sorted({j.max_epochs for j in ran if j.max_epochs is not None}),
        fixed=fixed,
        average_over=average_over,
        varying=swept_keys(jobs, average_over),
        seeds=(min((len(g.completed) for g in groups), default=0), max((len(g.completed) for g in groups), default=0)),
        title=title,
    )


METRIC_NAMES = {  # metric key -> words for tables, axes and legends; "%": a share, shown in percent
    "val/knn_top1": "kNN top-1 (%)",
    "val/knn_top5": "kNN top-5 (%)",
    "val/linear_top1": "online linear top-1 (%)",
    "eval/knn200_top1": "offline 200-NN top-1 (%)",
    "val/knn_memory_size": "kNN monitor: train images voting",
    "val/knn_queries": "kNN monitor: test images scored",
    "mining/pos_kept": "mined positives kept per query",
    "mining/pos_purity": "mined positives of the query's class (%)",
    "mining/neg_kept": "negatives kept per query",
    "mining/neg_fn_kept": "false negatives among kept (%)",
    "mining/neg_fn_dropped": "false negatives among dropped (%)",
    "mining/neg_grad_share_kept": "gradient share of kept negatives (%)",
    "mining/neg_sim_kept": "similarity of kept negatives",
    "mining/neg_sim_dropped": "similarity of dropped negatives",
}
ACCURACY = ("val/knn_top1", "val/knn_top5", "val/linear_top1", "eval/knn200_top1")  # first in tables, in this order


def metric_name(metric: str) -> str:
    """`val/knn_top1` -> `kNN top-1 (%)`; `eval/linear_lab_best_top1` -> `linear (lab) top-1, best test epoch (%)`;
    an unknown metric reads as its last part in words."""
    if metric in METRIC_NAMES:
        return METRIC_NAMES[metric]
    if metric.startswith("eval/linear_") and metric.endswith("_top1"):
        protocol, best = metric[len("eval/linear_") : -len("_top1")], False
        if protocol.endswith("_best"):
            protocol, best = protocol[: -len("_best")], True
        return f"linear ({protocol}) top-1, {'best test' if best else 'final'} epoch (%)"
    return metric.rsplit("/", 1)[-1].replace("_", " ")


COUNTS = ("val/knn_memory_size", "val/knn_queries")  # numbers of things, as the metrics `... per query`


def is_count(metric: str) -> bool:
    """A number of things, not a rate: kept out of the results tables, in a table of its own."""
    return metric in COUNTS or metric_name(metric).endswith("per query")


def shown(metric: str, value: float) -> float:
    """The value as tables and plots show it: shares in percent."""
    return 100 * value if metric_name(metric).endswith("(%)") else value


def _order(metric: str) -> tuple:
    if metric in ACCURACY:
        return (0, ACCURACY.index(metric), metric)
    if metric.startswith("eval/"):
        return (1, "best" not in metric, metric)  # the lab's best-epoch figure before the final epoch's
    return (2, 0, metric)


def metrics_of(groups: list[Group], prefix: str | tuple[str, ...] = "") -> list[str]:
    """Metric names with a final value in some completed job, monitors first, then the offline evaluations."""
    names = {m for g in groups for j in g.completed for m in j.final if m.startswith(prefix)}
    return sorted(names, key=_order)


def decimals(metric: str, means: list[float]) -> int:
    """One precision for a metric's means and stds: 2 decimals for percentages, else 3 significant digits of the largest mean."""
    if metric_name(metric).endswith("(%)"):
        return 2
    biggest = max((abs(shown(metric, m)) for m in means if not math.isnan(m)), default=0.0)
    return 0 if biggest == 0 else int(min(6, max(0, 2 - math.floor(math.log10(biggest)))))


def _cell(metric: str, mean: float, std: float, places: int) -> str:
    if math.isnan(mean):
        return "-"
    mean, std = shown(metric, mean), shown(metric, std)
    return f"{mean:.{places}f}" if math.isnan(std) else f"{mean:.{places}f} ± {std:.{places}f}"


def _group_cells(g: Group, keys: list[str], named: bool) -> list[str]:
    return [*([g.label] if named else []), *(g.values.values() if keys else ([] if named else [g.label]))]


def _table(groups: list[Group], metrics: list[str], runs: bool = True) -> list[str]:
    keys = list(groups[0].values)
    named = any(g.name for g in groups)
    head = [
        *(["variant"] if named else []),
        *(keys or ([] if named else ["group"])),
        *(["runs"] if runs else []),
        *map(metric_name, metrics),
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    places = {m: decimals(m, [g.stats(m)[0] for g in groups]) for m in metrics}
    for g in groups:
        cells = [*_group_cells(g, keys, named), *([f"{len(g.completed)}/{len(g.jobs)}"] if runs else [])]
        cells += [_cell(m, *g.stats(m)[:2], places[m]) for m in metrics]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _count_table(groups: list[Group], metrics: list[str]) -> list[str]:
    """Counts as counts: the value where every run of a group logged the same, else its range."""
    keys = list(groups[0].values)
    named = any(g.name for g in groups)
    head = [*(["variant"] if named else []), *(keys or ([] if named else ["group"])), *map(metric_name, metrics)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for g in groups:
        cells = _group_cells(g, keys, named)
        for m in metrics:
            values = sorted({round(j.final[m], 1) for j in g.completed if m in j.final})
            cells.append("-" if not values else f"{values[0]:g}" if len(values) == 1 else f"{values[0]:g}-{values[-1]:g}")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


# --- published figures and paired differences ------------------------------------------------------
def published() -> dict[str, Any]:
    """mcl/published.yaml: the lab's table and the paper's figures (shipped with the package)."""
    return yaml.safe_load(resources.files("mcl").joinpath("published.yaml").read_text(encoding="utf-8"))


def _ours(g: Group, metrics: tuple[str, ...]) -> tuple[str | None, float, float, int]:
    """The first of `metrics` the group has, with its mean, std and count (in percent)."""
    for m in metrics:
        mean, std, n = g.stats(m)
        if n:
            return m, 100 * mean, 100 * std, n
    return None, math.nan, math.nan, 0


def published_rows(groups: list[Group]) -> list[dict[str, Any]]:
    """Per group whose runs share a preset and dataset with a published figure: the figures, ours and the difference.

    200-NN: ours is the offline 200-NN (mcl.eval) where the runs have it, else the online kNN
    monitor (k=200, t=0.1 by default). Linear: ours is the lab protocol's best test epoch (as the
    lab reports it). budget_differs: our epochs or backbone width are not the published ones (then
    the difference measures the smaller budget, it is no reproduction); `differs` says which.
    """
    table = published()
    rows = []
    for g in groups:
        presets, datasets = {j.preset for j in g.completed}, {j.dataset for j in g.completed}
        if len(presets) != 1 or len(datasets) != 1:
            continue
        preset, dataset = presets.pop(), datasets.pop()
        entry = table["presets"].get(preset or "", {})
        figures_ = entry.get(dataset)
        if not figures_:
            continue
        source = table["sources"][entry["source"]]
        epochs = sorted({j.max_epochs for j in g.completed if j.max_epochs is not None})
        row: dict[str, Any] = {
            "group": g.label,
            "preset": preset,
            "published_as": entry["name"],
            "dataset": dataset,
            "source": entry["source"],
        }
        for what, ours in (("knn200", ("eval/knn200_top1", "val/knn_top1")), ("linear", ("eval/linear_lab_best_top1",))):
            metric, mean, std, n = _ours(g, ours)
            pub = figures_.get(what)
            row[what] = {"published": pub, "ours_metric": metric, "ours_mean": mean, "ours_std": std, "n": n}
            row[what]["difference"] = mean - pub if pub is not None and n else math.nan
        widths = sorted({j.width for j in g.completed if j.width is not None})
        differs = [f"{'/'.join(map(str, epochs))} vs {source['epochs']} epochs"] if epochs != [source["epochs"]] else []
        differs += [f"width {'/'.join(map(str, widths))} vs {source['width']}"] if widths and widths != [source["width"]] else []
        row |= {
            "epochs": epochs,
            "published_epochs": source["epochs"],
            "widths": widths,
            "budget_differs": bool(differs),
            "differs": differs,
        }
        rows.append(row)
    return rows


T_MASS = 0.95  # the paired intervals' coverage


def t_central_mass(t: float, df: int) -> float:
    """P(|T| <= t) for Student's t with an integer df >= 1, in closed form (Abramowitz & Stegun 26.7.3-4):
    theta = atan(t / sqrt(df)); odd df: (2/pi)(theta + sin cos (1 + 2/3 cos^2 + 2*4/(3*5) cos^4 + ...)),
    even df: sin (1 + 1/2 cos^2 + 1*3/(2*4) cos^4 + ...), the sums running to cos^(df-3) and cos^(df-2)."""
    theta = math.atan(t / math.sqrt(df))
    c2 = math.cos(theta) ** 2
    term = total = 1.0
    if df % 2:
        for k in range(1, (df - 3) // 2 + 1):
            term *= c2 * (2 * k) / (2 * k + 1)
            total += term
        return 2 / math.pi * (theta + (math.sin(theta) * math.cos(theta) * total if df > 1 else 0.0))
    for k in range(1, (df - 2) // 2 + 1):
        term *= c2 * (2 * k - 1) / (2 * k)
        total += term
    return math.sin(theta) * total


def t_quantile(mass: float, df: int) -> float:
    """The t with P(|T| <= t) = mass (the two-sided quantile: 4.303 for 95 % and df 2), by bisection."""
    lo, hi = 0.0, 1.0
    while t_central_mass(hi, df) < mass:
        hi *= 2
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_central_mass(mid, df) < mass else (lo, mid)
    return (lo + hi) / 2


def paired_difference(variant: Group, baseline: Group, metric: str) -> dict[str, Any]:
    """Mean over the shared seeds of (variant - baseline) (shown units: points for percentages) with a
    95 % t interval: mean ± t(0.975, n-1) * sd / sqrt(n), sd the sample std of the n paired differences.
    within_noise: the interval holds 0 (None below two shared seeds: no interval)."""
    base = {j.seed: j.final[metric] for j in baseline.completed if metric in j.final and j.seed is not None}
    ours = {j.seed: j.final[metric] for j in variant.completed if metric in j.final and j.seed is not None}
    seeds = sorted(base.keys() & ours.keys())
    diffs = [shown(metric, ours[s]) - shown(metric, base[s]) for s in seeds]
    out: dict[str, Any] = {"seeds": seeds, "n": len(diffs), "mean": float(np.mean(diffs)) if diffs else math.nan}
    out |= {"low": math.nan, "high": math.nan, "within_noise": None}
    if len(diffs) > 1:
        half = t_quantile(T_MASS, len(diffs) - 1) * float(np.std(diffs, ddof=1)) / math.sqrt(len(diffs))
        out |= {"low": out["mean"] - half, "high": out["mean"] + half, "within_noise": out["mean"] - half <= 0 <= out["mean"] + half}
    return out


def choose_baseline(groups: list[Group], baseline: str | None = None) -> Group:
    """The group named `baseline` (its label, a value, or `key=value`), else the one with a value `moco_v2`, else the first."""
    if baseline is not None:
        for g in groups:
            if baseline in (g.label, g.auto_label, *g.values.values(), *(f"{k}={v}" for k, v in g.values.items())):
                return g
        raise ValueError(f"--baseline {baseline} names no group; the groups are {[g.label for g in groups]}")
    return next((g for g in groups if "moco_v2" in g.values.values()), groups[0])


def _baseline_key(chosen: Group, baseline: str | None) -> str | None:
    """The override key whose value made `chosen` the baseline (`experiment` for moco_v2), None for a label or the first group."""
    wanted = "moco_v2" if baseline is None else baseline.rpartition("=")[2]
    for k, v in chosen.values.items():
        if v == wanted and (baseline is None or baseline in (v, f"{k}={v}")):
            return k
    return None


def paired_rows(groups: list[Group], metrics: list[str], baseline: str | None = None) -> list[dict[str, Any]]:
    """Each group's paired difference (paired_difference) to its baseline, per metric.

    Where the baseline is a value of one swept key (`experiment=moco_v2`), a group is paired with the
    group that has that value and the group's own other values (a sweep over presets x datasets pairs
    on each dataset); groups with the baseline value are the baselines. Else every group is paired
    with the one baseline group."""
    chosen = choose_baseline(groups, baseline)
    key = _baseline_key(chosen, baseline)
    rows = []
    for g in groups:
        if key is None:
            base = chosen if g is not chosen else None
        else:
            wanted = {**g.values, key: chosen.values[key]}
            base = next((b for b in groups if b.values == wanted), None) if g.values[key] != chosen.values[key] else None
        if base is None:
            continue
        rows += [{"group": g.label, "baseline": base.label, "metric": m, **paired_difference(g, base, m)} for m in metrics]
    return rows


def _signed(x: float) -> str:
    return f"{x:+.2f}".replace("-", "−")


def paired_lines(groups: list[Group], metrics: list[str], baseline: str | None = None) -> list[str]:
    chosen = choose_baseline(groups, baseline)
    key = _baseline_key(chosen, baseline)
    by_group = defaultdict(dict)
    for r in paired_rows(groups, metrics, baseline):
        by_group[r["group"]][r["metric"]] = r
    strata = key is not None and len(chosen.values) > 1  # one baseline per value of the other keys
    to = f"{short_keys(list(chosen.values))[key]}={chosen.values[key]}" if strata else chosen.label
    lines = [
        f"## Paired differences to {to}",
        "",
        f"Per seed both ran: variant minus {to}"
        + (" (the group with the variant's other values)" if strata else "")
        + ", in points; mean over those seeds with a 95 % t interval. Within noise: the interval holds 0.",
        "",
    ]
    keys = list(groups[0].values)
    named = any(g.name for g in groups)
    head = [*(["variant"] if named else []), *keys, *(f"{metric_name(m)}: difference [95 % CI]" for m in metrics)]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for g in groups:
        if g.label not in by_group:
            continue
        cells = _group_cells(g, keys, named)
        for m in metrics:
            d = by_group[g.label][m]
            if d["n"] == 0:
                cells.append("no shared seed")
            elif d["n"] == 1:
                cells.append(f"{_signed(d['mean'])} (1 seed: no interval)")
            else:
                noise = ", within noise" if d["within_noise"] else ""
                cells.append(f"{_signed(d['mean'])} [{_signed(d['low'])}, {_signed(d['high'])}] ({plural(d['n'], 'seed')}{noise})")
        lines.append("| " + " | ".join(cells) + " |")
    return [*lines, ""]


def _fmt(x: float | None) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.2f}"


def published_lines(groups: list[Group]) -> list[str]:
    rows = published_rows(groups)
    table = published()
    if not rows:
        presets = {j.preset for g in groups for j in g.completed} & set(table["presets"])
        if not presets:
            return []
        datasets = sorted({d for p in presets for d in table["presets"][p] if d not in ("name", "source")})
        return [
            "## Published figures",
            "",
            f"None for these runs' dataset ({', '.join(sorted({j.dataset or '?' for g in groups for j in g.completed}))}); "
            f"the published ones are on {', '.join(datasets)}.",
            "",
        ]
    lines = [
        "## Published figures",
        "",
        "| variant | published as | dataset | 200-NN published | ours | difference | linear published | ours (best epoch) | difference | budget |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        k, lin = r["knn200"], r["linear"]
        ours_knn = (
            f"{_fmt(k['ours_mean'])}"
            + ("" if k["n"] < 2 else f" ± {_fmt(k['ours_std'])}")
            + (" (online)" if k["ours_metric"] == "val/knn_top1" else "")
        )
        ours_lin = f"{_fmt(lin['ours_mean'])}" + ("" if lin["n"] < 2 else f" ± {_fmt(lin['ours_std'])}")
        epochs = "/".join(map(str, r["epochs"])) or "?"
        budget = f"**budget differs**: {', '.join(r['differs'])}" if r["budget_differs"] else f"{epochs} epochs, as published"
        diff = lambda x: "-" if math.isnan(x) else _signed(x)  # noqa: E731
        lines.append(
            f"| {r['group']} | {r['published_as']} | {r['dataset']} | {_fmt(k['published'])} | {ours_knn} | {diff(k['difference'])} | "
            f"{_fmt(lin['published'])} | {ours_lin} | {diff(lin['difference'])} | {budget} |"
        )
    lines.append("")
    if any(r["budget_differs"] for r in rows):
        lines += [
            "The budget differs from the published one: these differences measure the shorter (or longer) training, "
            "they do not say whether mcl reproduces the published figure.",
            "",
        ]
    for name in sorted({r["source"] for r in rows}):
        source = table["sources"][name]
        commit = f" (commit {source['commit']})" if source.get("commit") else ""
        epochs = f"{source['epochs']} epochs" + (" (assumed: not stated)" if source.get("epochs_assumed") else "")
        lines.append(f"- {name}: {source['what']}{commit}; {epochs}. {source['note'][0].upper()}{source['note'][1:]}.")
    lines += [
        "- ours: offline 200-NN (mcl.eval) where the runs have it, else the online kNN monitor (online); linear: protocol=lab, best test epoch.",
        "",
    ]
    return lines


# --- the report -----------------------------------------------------------------------------------
def results_metrics(groups: list[Group], metrics: list[str] | None = None) -> list[str]:
    """The results table's metrics: `metrics` (checked), else every `val/*` and `eval/*` metric that is no count."""
    available = metrics_of(groups, ("val/", "eval/", "mining/"))
    if metrics:
        unknown = [m for m in metrics if m not in available]
        if unknown:
            raise ValueError(f"--metrics {' '.join(unknown)}: no completed job has it; the metrics: {' '.join(available)}")
        return list(metrics)
    return [m for m in available if m.startswith(("val/", "eval/")) and not is_count(m)]


def accuracy_metrics(groups: list[Group], metrics: list[str] | None = None) -> list[str]:
    """The accuracies the plot and the paired differences show: the chosen ones, else the lab's offline
    figures where the runs have them (200-NN, linear best epoch), else the online kNN and linear monitors."""
    if metrics:
        return [m for m in metrics if metric_name(m).endswith("(%)")]
    have = set(metrics_of(groups))
    offline = [m for m in metrics_of(groups, "eval/") if m == "eval/knn200_top1" or m.endswith("_best_top1")]
    return offline or [m for m in ("val/knn_top1", "val/linear_top1") if m in have]


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
        *_table(groups, table_metrics),
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
        lines += ["## Mining diagnostics (final epoch)", "", *_table(groups, diagnostics), ""]
    if counts:
        lines += ["## Counts (final epoch)", "", *_count_table(groups, counts), ""]
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


# --- plots --------------------------------------------------------------------------------
MARKERS = "osD^vPX*"  # a group keeps its colour C<i> and marker in every plot


def _titled(fig: Figure, what: str, setting: Setting) -> Figure:
    """A title of words (dataset, budget, what varies; or the user's), and below it what is drawn."""
    width = int(fig.get_figwidth() * 12)  # characters of a medium-size line that fit the figure
    fig.suptitle("\n".join(textwrap.fill(line, width) for line in (setting.words, what)), fontsize="medium")
    return fig


def plot_accuracy(groups: list[Group], setting: Setting, metrics: list[str] | None = None) -> Figure | None:
    """Final accuracy per group, one panel per metric: the mean (marker) ± one std (bar), beside it a dot
    per run, the runs of one seed joined by a thin line (what the paired differences compare).

    The axis spans the values drawn (not from 0), so a gap of a point shows."""
    groups = [g for g in groups if g.completed]
    metrics = [m for m in (metrics or accuracy_metrics(groups)) if any(m in j.final for g in groups for j in g.completed)]
    if not metrics:
        return None
    fig = Figure(figsize=(max(6.5, (0.9 * len(groups) + 1.5) * len(metrics)), 4.6), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(metrics), squeeze=False)).ravel()
    for ax, metric in zip(axes, metrics):
        drawn, by_seed = [], defaultdict(list)  # seed -> [(x, value)] across groups
        for i, g in enumerate(groups):
            runs = [(j.seed, shown(metric, j.final[metric])) for j in g.completed if metric in j.final]
            if not runs:
                continue
            mean, std, _ = g.stats(metric)
            mean, std = shown(metric, mean), 0.0 if math.isnan(std) else shown(metric, std)
            ax.errorbar([i], [mean], yerr=[std], fmt=MARKERS[i % len(MARKERS)], color=f"C{i}", markersize=8, capsize=5, zorder=2)
            ax.scatter([i + 0.22] * len(runs), [v for _, v in runs], color="black", s=12, zorder=3, alpha=0.7)
            for seed, v in runs:
                if seed is not None:
                    by_seed[seed].append((i + 0.22, v))
            drawn += [v for _, v in runs] + [mean - std, mean + std]
        for points in by_seed.values():
            if len(points) > 1:
                ax.plot(*zip(*points), color="grey", linewidth=0.6, alpha=0.5, zorder=1)
        lo, hi = min(drawn), max(drawn)
        pad = max(0.15 * (hi - lo), 0.5)
        ax.set_ylim(lo - pad, hi + pad)
        ax.set_xlim(-0.6, len(groups) - 0.4)
        many = len(groups) > 2
        ax.set_xticks(np.arange(len(groups)), [g.label for g in groups], rotation=20 if many else 0, ha="right" if many else "center")
        ax.set_title(metric_name(metric), fontsize="medium")
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("top-1 accuracy (%)")
    return _titled(fig, "Final accuracy: mean ± std over seeds; a dot per run, one seed's runs joined", setting)


def _plot_history(ax, groups: list[Group], metric: str) -> bool:
    drawn, every = False, set()
    dodge = 0.06 * (len(groups) > 1)
    for i, g in enumerate(groups):
        curves = [j.history[metric] for j in g.completed if metric in j.history]
        epochs = sorted({e for c in curves for e in c})
        if not epochs:
            continue
        values = np.array([[shown(metric, c.get(e, np.nan)) for e in epochs] for c in curves])  # runs x epochs
        mean = np.nanmean(values, axis=0)
        std = np.nanstd(values, axis=0, ddof=1) if len(curves) > 1 else np.zeros_like(mean)
        x = np.array(epochs) + 1  # metrics.csv counts epochs from 0; a value logged in epoch e is after e + 1 epochs
        shift = (i - (len(groups) - 1) / 2) * dodge  # a little apart, so equal lines do not hide each other
        label = f"{g.label} (n={len(curves)})"
        ax.plot(x + shift, mean, marker=MARKERS[i % len(MARKERS)], markersize=4, color=f"C{i}", label=label, alpha=0.9)
        if len(x) > 1:
            ax.fill_between(x + shift, mean - std, mean + std, color=f"C{i}", alpha=0.15)
        else:  # one epoch: a band would be a line; error bars
            ax.errorbar(x + shift, mean, yerr=std, fmt="none", ecolor=f"C{i}", capsize=4)
        drawn, every = True, every | set(x.tolist())
    if every and max(every) - min(every) < 4:  # a short run: whole epochs, with room around the points
        ax.set_xlim(min(every) - 0.5, max(every) + 0.5)
        ax.set_xticks(sorted(every))
    else:
        ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("epochs trained")
    ax.set_ylabel(metric_name(metric))
    ax.grid(alpha=0.3)
    return drawn


def _legend(fig: Figure, axes: list, groups: list[Group], loc: str) -> None:
    """One legend for the figure, outside the axes: every group once, in launch order."""
    handles = {label: handle for ax in axes for handle, label in zip(*ax.get_legend_handles_labels())}
    order = [g.label for g in groups]
    labels = sorted(handles, key=lambda label: order.index(label.rsplit(" (n=", 1)[0]))
    ncols = 1 if "right" in loc else min(4, len(labels))
    fig.legend([handles[k] for k in labels], labels, loc=loc, ncols=ncols, fontsize="small", frameon=False)


def plot_history(groups: list[Group], setting: Setting, metric: str = "val/knn_top1") -> Figure | None:
    """One metric over epochs: a line per group (mean over seeds) with a one-std band; the legend right of the axes."""
    fig = Figure(figsize=(8.0, 4.4), layout="constrained")
    ax = fig.subplots()
    if not _plot_history(ax, groups, metric):
        return None
    _legend(fig, [ax], groups, "outside center right")
    return _titled(fig, f"{metric_name(metric)} per epoch: mean ± std over seeds", setting)


def plot_diagnostics(groups: list[Group], setting: Setting) -> Figure | None:
    """Every `mining/*` metric over epochs, one panel each; the legend below the panels."""
    names = metrics_of(groups, "mining/")
    if not names:
        return None
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    fig = Figure(figsize=(max(6.5, 4.4 * cols), 3.0 * rows + 1.4), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    for ax, name in zip(axes, names):
        _plot_history(ax, groups, name)
        ax.set_title(metric_name(name), fontsize="medium")
        ax.set_ylabel("")
    lo, hi = min(ax.get_xlim()[0] for ax in axes[: len(names)]), max(ax.get_xlim()[1] for ax in axes[: len(names)])
    ticks = sorted({t for ax in axes[: len(names)] for t in ax.get_xticks() if lo <= t <= hi})
    for ax in axes[: len(names)]:  # one epoch axis for every panel, also those a metric logged only late
        ax.set_xlim(lo, hi)
        ax.set_xticks(ticks)
    for ax in axes[len(names) :]:
        ax.set_axis_off()
    _legend(fig, list(axes), groups, "outside lower center")
    return _titled(fig, "Mining diagnostics per epoch: mean ± std over seeds", setting)


PLOTS = ("accuracy", "knn_over_epochs", "diagnostics")  # written as <name>.png, <name>.svg and <name>.pdf


def figures(groups: list[Group], setting: Setting, metrics: list[str] | None = None) -> dict[str, Figure | None]:
    return {
        "accuracy": plot_accuracy(groups, setting, accuracy_metrics(groups, metrics)),
        "knn_over_epochs": plot_history(groups, setting, "val/knn_top1"),
        "diagnostics": plot_diagnostics(groups, setting),
    }


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
        "setting": {k: v for k, v in vars(setting).items()} | {"average_over": list(average_over)},
        "groups": summary(groups),
        "published": _clean(published_rows(groups)),
        "paired": _clean(paired),
    }
    vector = [str(Path(p).with_suffix(s)) for p in plots for s in (".svg", ".pdf")]
    (out / "report.json").write_text(json.dumps({**report, "plots": plots, "vector_plots": vector}, indent=2))
    return out / "report.md"


def parse_labels(pairs: list[str]) -> dict[str, str]:
    """`--labels 'negative=all:MoCo v2' ...`: automatic label, a colon, the name to show."""
    out = {}
    for pair in pairs:
        old, sep, new = pair.partition(":")
        if not sep or not old or not new:
            raise ValueError(f"--labels {pair!r}: write LABEL:NAME, e.g. 'negative=gradient:gradient band' (LABEL as the report shows it)")
        out[old] = new
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mcl.report", description=__doc__.splitlines()[0])
    parser.add_argument(
        "dirs", nargs="+", help="sweep dirs (multirun/<task>/<date_time>), run dirs (outputs/<task>/<date_time>) or folders of them"
    )
    parser.add_argument("--out", default=None, help="write the report here (default: the one dir given; with several, reports/<date_time>)")
    parser.add_argument("--average-over", nargs="*", default=["seed"], help="override keys averaged over (default: seed)")
    parser.add_argument("--title", default=None, help="the figures' and the report's title (default: dataset, budget and what varies)")
    parser.add_argument(
        "--metrics",
        nargs="+",
        default=None,
        help="metrics of the results table, accuracy plot and paired differences, e.g. eval/knn200_top1 val/knn_top1",
    )
    parser.add_argument("--labels", nargs="+", default=[], help="rename groups: 'LABEL:NAME', e.g. 'negative=gradient:gradient band'")
    parser.add_argument(
        "--baseline", default=None, help="the group the paired differences are taken to (default: moco_v2 where present, else the first)"
    )
    args = parser.parse_args(argv)
    try:
        path = write_report(
            args.dirs, args.out, tuple(args.average_over), args.title, args.metrics, parse_labels(args.labels), args.baseline
        )
    except (FileNotFoundError, ValueError) as err:
        parser.exit(2, f"mcl.report: {err}\n")
    print(path.read_text())
    print(f"written: {path} (and report.json, plots as PNG, SVG and PDF) in {path.parent}")


if __name__ == "__main__":
    main()
