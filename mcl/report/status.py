"""`job.json`, written by every job: a Hydra callback that records a job's status and, when it fails, its error."""

from __future__ import annotations

import json
import os
import sys
import traceback
from datetime import datetime
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

STATUS_FILE = "job.json"


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
