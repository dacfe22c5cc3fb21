"""The records a run dir keeps of its runs: `job.json` (written by `JobStatusFile`, a Hydra callback in
conf/hydra/default.yaml) and `config_resolved.yaml` (written by mcl.train when training starts).

A run that does not start writes nothing into a run dir that already holds a run: a refused resume
(`ckpt_path=` with other settings, an unreadable checkpoint) leaves every file as it was, so mcl.report
reads the finished run as before; a single run (not a sweep's job) that fails before training leaves
no run dir (its error is printed; a sweep's failed job keeps its dir and job.json for mcl.report),
and neither does a trainer.fast_dev_run (debug=fast) smoke test.
A resume that starts keeps what was there: job.json's record of the
earlier part moves into its `earlier` list (oldest first), and the config_resolved.yaml it replaces is
kept as `.hydra/resumed/<k>/previous_config_resolved.yaml`, beside that resume's `overrides.yaml`
(k = 1, 2, ...: the resumes in order).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import traceback
from datetime import datetime
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

STATUS_FILE = "job.json"
RUN_CONFIG = "config_resolved.yaml"
RESUMED = Path(".hydra") / "resumed"
_waiting: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {}  # run dir -> (its record, this job's), for a resume not yet training
_resumed: dict[str, list[dict[str, Any]]] = {}  # run dir -> the earlier records of a resume that started
_training: set[str] = set()  # run dirs whose training started in this process
HYDRA_ONLY = {".hydra", STATUS_FILE}  # what a run dir holds when its run failed before training


def holds_a_run(run_dir: Path) -> bool:
    """Whether an earlier run left its records in `run_dir`."""
    return (run_dir / STATUS_FILE).is_file() or (run_dir / RUN_CONFIG).is_file()


def is_rank_zero() -> bool:
    """False in a process of rank > 0 (started by Lightning, torchrun or srun), which writes no record."""
    return not any(int(os.environ.get(rank, 0)) for rank in ("LOCAL_RANK", "NODE_RANK", "RANK", "SLURM_PROCID"))


def read_record(run_dir: Path) -> dict[str, Any]:
    path = run_dir / STATUS_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def write_record(run_dir: Path, record: dict[str, Any], earlier: list[dict[str, Any]]) -> None:
    (run_dir / STATUS_FILE).write_text(json.dumps({**record, **({"earlier": earlier} if earlier else {})}, indent=2))


def job_fields(config: DictConfig) -> dict[str, Any]:
    return {"overrides": list(config.hydra.overrides.task), "num": config.hydra.job.get("num")}


class JobStatusFile(Callback):
    """Hydra callback: `job.json` in the job's output dir (running, then completed or failed).

    A failed job does not stop a sweep (Hydra's basic sweeper runs the whole batch and raises
    the first error at the end); this file keeps the error next to the job, for the report.
    A job in a run dir that holds an earlier run (a resume) writes only once its training starts
    (`training_started`). Only the process of global rank 0 writes it.
    """

    def _write(self, out: Path, config: DictConfig, earlier: list[dict[str, Any]], **fields: Any) -> None:
        write_record(out, {**job_fields(config), **fields}, earlier)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        print(f"mcl: sweep dir {config.hydra.sweep.dir}; when it ends: python -m mcl.report {config.hydra.sweep.dir}")

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._started = datetime.now()
        if not is_rank_zero() or writes_nothing(config):
            return
        out = Path(config.hydra.runtime.output_dir)
        if holds_a_run(out):
            _waiting[str(out)] = read_record(out), job_fields(config)  # written by training_started, or never
            return
        self._write(out, config, [], status="running", started=self._started.isoformat(timespec="seconds"))

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
            if config.hydra.job.get("num") is not None:  # a single run: mcl.train prints the error itself
                print(f"mcl: job {config.hydra.job.num} failed ({fields['error']}); the sweep goes on", file=sys.stderr)
        out = Path(config.hydra.runtime.output_dir)
        if not is_rank_zero() or _waiting.pop(str(out), None) is not None:
            return  # a resume that never started training: the run dir keeps its records
        if writes_nothing(config):
            remove_unused_run_dir(out)  # the empty dir Hydra made
            return
        started = str(out) in _training
        _training.discard(str(out))
        if job_return.status == JobStatus.FAILED and config.hydra.job.get("num") is None and not started:
            remove_unused_run_dir(out)
            return
        self._write(out, config, _resumed.pop(str(out), []), **fields)


def writes_nothing(config: DictConfig) -> bool:
    """trainer.fast_dev_run (debug=fast): a smoke test that leaves no run dir, no record, no checkpoint."""
    return bool(OmegaConf.select(config, "trainer.fast_dev_run", default=False))


def remove_unused_run_dir(out: Path) -> None:
    """Remove the run dir of a run that failed before training (only Hydra's files and job.json in it), and the
    folders above it that are left empty, up to the working directory."""
    if not out.is_dir() or {p.name for p in out.iterdir()} - HYDRA_ONLY:
        return
    shutil.rmtree(out)
    cwd = Path.cwd().resolve()
    for parent in out.resolve().parents:
        if parent == cwd or cwd.is_relative_to(parent) or any(parent.iterdir()):
            break
        parent.rmdir()


def training_started(out: Path, cfg: DictConfig, overrides: list[str]) -> None:
    """Called by mcl.train on rank 0 once every check passed, before training: keeps an earlier run's records
    (see the module docstring), then writes this run's config_resolved.yaml (and job.json: running)."""
    out.mkdir(parents=True, exist_ok=True)
    _training.add(str(out))
    if (out / RUN_CONFIG).is_file():
        k = 1 + sum(1 for d in (out / RESUMED).glob("*") if d.name.isdigit())
        kept = out / RESUMED / str(k)
        kept.mkdir(parents=True)
        (out / RUN_CONFIG).replace(kept / f"previous_{RUN_CONFIG}")
        OmegaConf.save(OmegaConf.create(overrides), kept / "overrides.yaml")
    OmegaConf.save(cfg, out / RUN_CONFIG, resolve=True)
    if str(out) not in _waiting:
        return
    record, fields = _waiting.pop(str(out))
    earlier = [*record.pop("earlier", []), record] if record else []
    _resumed[str(out)] = earlier
    write_record(out, {**fields, "status": "running", "started": datetime.now().isoformat(timespec="seconds")}, earlier)


DATA_PATH_KEYS = ("dataset.root", "dataset.path", "dataset.source.root", "dataset.source.path", "dataset.source.cache_dir")


def launch_dir(run_dir: Path) -> Path | None:
    """The directory a run was started from (Hydra's hydra.runtime.cwd, in the run's .hydra/hydra.yaml); None if unrecorded."""
    path = Path(run_dir) / ".hydra" / "hydra.yaml"
    cwd = OmegaConf.select(OmegaConf.load(path), "hydra.runtime.cwd", default=None) if path.is_file() else None
    return Path(cwd) if cwd else None


def with_run_paths(run_cfg: DictConfig, run_dir: Path) -> DictConfig:
    """A run's config whose relative data paths (paths.data_dir: `data`, `cache`) point where that run read them:
    under the directory it was started from, not under the one a notebook or script runs in now."""
    base = launch_dir(run_dir)
    cfg = run_cfg.copy()
    for key in DATA_PATH_KEYS if base is not None else ():
        value = OmegaConf.select(cfg, key, default=None, throw_on_resolution_failure=False)
        if isinstance(value, str) and value and not os.path.isabs(value):
            OmegaConf.update(cfg, key, str(base / value))
    return cfg
