"""`python -m mcl.eval.sweep 'dirs=[SWEEP_DIR]'`: every job of a sweep (or a list of runs) evaluated.

Each completed job's last checkpoint (`checkpoints/last.ckpt`) gets what `mcl.eval.knn` and
`mcl.eval.linear` give one checkpoint: the kNN grid and the linear protocol (conf/eval/sweep.yaml),
written beside the checkpoint. A job that already has a result with the same settings is skipped,
so a sweep evaluation stopped half way resumes where it was; other settings write a new result
(`.2.json`) and leave the earlier one. Jobs that did not complete, or left no checkpoint, are
listed and left out. `python -m mcl.report SWEEP_DIR` then puts the results in its table.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from mcl.eval.common import EvalError, find_result
from mcl.eval.knn import knn_grid, knn_settings
from mcl.eval.linear import linear_eval, linear_settings, print_result
from mcl.report import load_runs

CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf" / "eval")


def evaluate_runs(cfg: DictConfig) -> list[dict[str, Any]]:
    """Evaluate every job under cfg.dirs; returns one row per job and evaluation: {job, what, status, json}.

    status: `done` (evaluated now), `skipped` (a result with these settings exists), `failed`
    (the evaluation raised EvalError: the message is kept), or why the job was left out.
    """
    dirs = [cfg.dirs] if isinstance(cfg.dirs, str) else list(cfg.dirs)
    if not dirs:
        raise EvalError("dirs is empty: give the sweep dirs or run dirs to evaluate, e.g. 'dirs=[multirun/ablation/DATE_TIME]'")
    try:
        jobs = load_runs(*dirs)
    except FileNotFoundError as err:
        raise EvalError(str(err)) from None
    wanted = [name for name, on in (("knn", cfg.knn), (f"linear-{cfg.protocol.name}", cfg.linear)) if on]
    rows: list[dict[str, Any]] = []
    for job in jobs:
        ckpt = job.dir / cfg.checkpoint
        if job.status != "completed" or not ckpt.is_file():
            why = f"left out: {job.status}" if job.status != "completed" else f"left out: no {cfg.checkpoint}"
            rows += [{"job": job.name, "what": what, "status": why, "json": None} for what in wanted]
            continue
        job_cfg = OmegaConf.create({**OmegaConf.to_container(cfg, resolve=True), "ckpt_path": str(ckpt)})
        for what in wanted:
            is_knn = what == "knn"
            done = find_result(ckpt, what, knn_settings(job_cfg) if is_knn else linear_settings(job_cfg))
            if done is not None:
                rows.append({"job": job.name, "what": what, "status": "skipped", "json": str(done)})
                continue
            print(f"== {job.name}: {what} ==", flush=True)
            try:
                result = knn_grid(job_cfg) if is_knn else linear_eval(job_cfg)
            except EvalError as err:
                rows.append({"job": job.name, "what": what, "status": f"failed: {err}", "json": None})
                continue
            if not is_knn:
                print_result(result)
            rows.append({"job": job.name, "what": what, "status": "done", "json": result["json"]})
    return rows


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="sweep")
def main(cfg: DictConfig) -> None:
    try:
        rows = evaluate_runs(cfg)
    except EvalError as err:  # nothing to evaluate (a wrong dir, an empty list): one line, no traceback
        print(f"mcl.eval.sweep: {err}", file=sys.stderr)
        sys.exit(2)
    width = max(len(r["job"]) for r in rows)
    print(f"\n{'job':<{width}}  {'evaluation':<12} status")
    for r in rows:
        print(f"{r['job']:<{width}}  {r['what']:<12} {r['status']}" + (f"  ({r['json']})" if r["json"] else ""))
    done = sum(r["status"] in ("done", "skipped") for r in rows)
    print(f"{done}/{len(rows)} evaluations have results; the report: python -m mcl.report {' '.join(map(str, cfg.dirs))}")
    if any(r["status"].startswith("failed") for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
