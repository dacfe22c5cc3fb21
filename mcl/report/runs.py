"""Reading runs back: every job of a sweep dir, a run dir or a folder of them, with its overrides, status,
metrics per epoch (metrics.csv), setting (its saved config) and offline evaluations (beside its last checkpoint)."""

from __future__ import annotations

import csv
import itertools
import json
import math
import os
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from mcl.records import STATUS_FILE


def override_key(override: str) -> str:
    """`+mining.positive=soft` -> `mining.positive`."""
    return override.partition("=")[0].lstrip("+~")


def override_value(overrides: list[str], key: str, missing: str | None = None) -> str | None:
    """The value `overrides` give `key` (`mining.positive` -> `soft`), or `missing`."""
    return next((o.partition("=")[2] for o in overrides if override_key(o) == key), missing)


@dataclass(kw_only=True)
class RunSetting:
    """What a run's saved config says: the fields a Job carries beside its overrides and results."""

    dataset: str | None = None
    max_epochs: int | None = None
    seed: int | None = None
    preset: str | None = None  # the published figures' key: the experiment preset (nnclr_k5: nnclr with topk 5)
    width: int | None = None  # backbone.width: 64 is the published ResNets'


@dataclass
class Job(RunSetting):
    """One run: a job of a sweep or a single run dir. history: metric -> {epoch: value}; evaluated:
    metric -> value of the offline evaluations beside its last checkpoint (`eval/*`); final: metric
    -> last epoch's value, and the evaluations. name: its dir relative to the dirs reported on
    (`3` in a sweep). dataset, max_epochs, seed, preset, width: its RunSetting (None when unreadable)."""

    num: int | None
    dir: Path
    overrides: list[str]
    status: str  # completed | failed | running (unfinished) | not started
    error: str | None = None
    history: dict[str, dict[int, float]] = field(default_factory=dict)
    name: str = ""
    evaluated: dict[str, float] = field(default_factory=dict)

    @property
    def final(self) -> dict[str, float]:
        return {**{name: by_epoch[max(by_epoch)] for name, by_epoch in self.history.items() if by_epoch}, **self.evaluated}

    def value(self, key: str, missing: str | None = None) -> str | None:
        """The value this job gave an override key (`mining.positive` -> `soft`), or `missing`."""
        return override_value(self.overrides, key, missing)


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
                dataset=str(dataset) if dataset is not None else None,
                max_epochs=int(epochs) if isinstance(epochs, int) else None,
                seed=int(seed) if isinstance(seed, int) else None,
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
        preset = override_value(overrides, "experiment")
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
    return Job(
        num=num,
        dir=run_dir,
        overrides=[str(o) for o in OmegaConf.load(run_dir / ".hydra" / "overrides.yaml")],
        status=status["status"],
        error=status.get("error"),
        history=read_metrics(run_dir / "metrics.csv"),
        name=name,
        **asdict(run_setting(run_dir)),
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
