"""Sweeps through the CLI (`python -m mcl.train -m ...`) and their report (`python -m mcl.report`)."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import MICRO, REPO, run_cli
from hydra import compose, initialize_config_dir

from mcl.report import expand_grid, expected_jobs, main, write_report
from mcl.train import CONF_DIR

# CPU-sized jobs: width-8 ResNet-18 on 16 x 16 digits, 2 steps of 16 images an epoch, one eval batch, no checkpoints.
SMALL = [
    *MICRO,
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=1",
    "callbacks=none",
]
ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # several tiny processes on 2 shared cores: no thread oversubscription


def final_knn(job: Path) -> list[float]:
    """val/knn_top1 of every validation epoch, read straight from the job's metrics.csv."""
    with (job / "metrics.csv").open() as f:
        return [float(r["val/knn_top1"]) for r in csv.DictReader(f) if r.get("val/knn_top1")]


def table_rows(markdown: str, section: str) -> list[list[str]]:
    """The body rows of the first table under `## section`, as lists of cells."""
    lines = markdown.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0].splitlines()
    rows = [line for line in lines if line.startswith("|")]
    return [[c.strip() for c in row.strip("|").split("|")] for row in rows[2:]]


@pytest.mark.slow
def test_sweep_2x2_over_two_seeds_reports_groups_counts_and_means(tmp_path):
    sweep = tmp_path / "sweep"
    grid = ["model.temperature=0.1,0.2", "mining.negative.exclude_self=true,false", "seed=0,1"]
    result = run_cli(["-m", *SMALL, "trainer.max_epochs=2", *grid, f"hydra.sweep.dir={sweep}"], cwd=tmp_path, env=ONE_THREAD)
    assert result.returncode == 0, result.stderr[-3000:]

    jobs = sorted((p for p in sweep.iterdir() if p.is_dir()), key=lambda p: int(p.name))
    assert [p.name for p in jobs] == [str(i) for i in range(8)]  # one output dir per job
    finals: dict[tuple[str, str], list[float]] = {}
    for num, job in enumerate(jobs):
        overrides = yaml.safe_load((job / ".hydra/overrides.yaml").read_text())
        assert overrides == expected_jobs(sweep)[num]  # the report re-expands the grid in Hydra's order
        assert json.loads((job / "job.json").read_text())["status"] == "completed"
        values = dict(o.split("=", 1) for o in overrides)
        knn = final_knn(job)
        assert len(knn) == 2  # one value per epoch
        finals.setdefault((values["model.temperature"], values["mining.negative.exclude_self"]), []).append(knn[-1])
    assert sorted(finals) == [("0.1", "False"), ("0.1", "True"), ("0.2", "False"), ("0.2", "True")]  # as Hydra records them

    main([str(sweep)])  # python -m mcl.report SWEEP_DIR
    markdown = (sweep / "report.md").read_text()
    assert "8 jobs: 8 completed, 0 failed" in markdown
    rows = table_rows(markdown, "Results")
    head = markdown.split("## Results\n", 1)[1].split("\n")[1]
    assert head.startswith("| model.temperature | mining.negative.exclude_self | runs | kNN top-1 (%) |")  # seed is averaged over
    assert len(rows) == 4
    for temperature, exclude_self, runs, knn_cell, *_ in rows:
        values = finals[(temperature, exclude_self)]
        assert runs == "2/2"
        assert knn_cell == f"{100 * np.mean(values):.2f} ± {100 * np.std(values, ddof=1):.2f}"  # percent
    groups = json.loads((sweep / "report.json").read_text())["groups"]
    assert [g["metrics"]["val/knn_top1"]["n"] for g in groups] == [2, 2, 2, 2]
    for g in groups:
        expected = finals[(g["values"]["model.temperature"], g["values"]["mining.negative.exclude_self"])]
        assert g["metrics"]["val/knn_top1"]["mean"] == pytest.approx(np.mean(expected))
    for plot in ("accuracy.png", "knn_over_epochs.png"):
        assert (sweep / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"![{plot}]({plot})" in markdown
        assert b"<svg" in (sweep / plot).with_suffix(".svg").read_bytes()[:1000]


@pytest.mark.slow
def test_a_failed_job_is_listed_and_the_sweep_goes_on(tmp_path):
    sweep = tmp_path / "sweep"
    # job 0: a queue size that is no multiple of the keys per step (fails its config check); job 1 trains
    result = run_cli(
        ["-m", *SMALL, "trainer.max_epochs=1", "model.queue_size=100,128", f"hydra.sweep.dir={sweep}"], cwd=tmp_path, env=ONE_THREAD
    )
    assert result.returncode != 0  # Hydra reports the failure when the sweep ends ...
    assert "job 0 failed (ConfigError" in result.stderr
    status = json.loads((sweep / "0" / "job.json").read_text())
    assert status["status"] == "failed" and "model.queue_size=100" in status["error"]
    assert json.loads((sweep / "1" / "job.json").read_text())["status"] == "completed"  # ... after running the rest
    assert final_knn(sweep / "1")

    markdown = write_report(sweep).read_text()
    assert "2 jobs: 1 completed, 1 failed" in markdown
    assert [row[:2] for row in table_rows(markdown, "Results")] == [["100", "0/1"], ["128", "1/1"]]
    failed = table_rows(markdown, "Failed and unfinished jobs")
    assert failed[0][:3] == ["0", "failed", "`model.queue_size=100`"] and failed[0][3].startswith("ConfigError: model.queue_size=100")

    # a sweep killed during job 1 (its job.json still says running), or before it started (no dir)
    killed = tmp_path / "killed"
    shutil.copytree(sweep, killed)
    (killed / "1" / "job.json").write_text(json.dumps({**json.loads((killed / "1" / "job.json").read_text()), "status": "running"}))
    markdown = write_report(killed).read_text()
    assert [row[:2] for row in table_rows(markdown, "Results")] == [["100", "0/1"], ["128", "0/1"]]  # never averaged
    assert [row[:3] for row in table_rows(markdown, "Failed and unfinished jobs")][1] == ["1", "running", "`model.queue_size=128`"]
    shutil.rmtree(killed / "1")
    markdown = write_report(killed).read_text()
    assert "2 jobs: 0 completed, 1 failed, 0 unfinished, 1 not started" in markdown
    assert table_rows(markdown, "Failed and unfinished jobs")[1][:3] == ["1", "not started", "`model.queue_size=128`"]


def test_report_of_a_missing_dir_is_one_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "nowhere")])
    assert exit_info.value.code == 2
    assert "is not a directory" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([str(tmp_path)])  # a directory without jobs
    assert "holds no jobs" in capsys.readouterr().err


@pytest.mark.parametrize("preset", sorted(p.stem for p in (REPO / "conf" / "sweep").glob("*.yaml")))
def test_sweep_presets_compose_every_job(preset, tmp_path):
    """Each job of a preset composes (jobs naming a strategy file not written yet are skipped)."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=[f"+sweep={preset}"], return_hydra_config=True)
        params = dict(cfg.hydra.sweeper.params)
        assert len(expand_grid(params, [])) > 1, f"conf/sweep/{preset}.yaml sweeps nothing"
        assert cfg.task_name == preset  # its own multirun/<task_name>/ dir
        composed = 0
        for job in expand_grid({k: v for k, v in params.items() if k != "seed"}, []):  # seeds change no composition
            strategies = [o.split("=", 1) for o in job if o.split("=", 1)[0] in ("mining.positive", "mining.negative")]
            if any(not (REPO / "conf" / group / f"{name}.yaml").exists() for group, name in strategies):
                continue
            job_cfg = compose("train", overrides=[f"+sweep={preset}", *job, f"paths.output_dir={tmp_path}"])
            for side in ("positive", "negative"):
                assert "_target_" in job_cfg.mining[side]
            composed += 1
        assert composed > 0


@pytest.mark.slow
def test_multirun_with_ddp_spawn_runs_each_job_once_on_two_processes(tmp_path):
    """The documented combination: `trainer=ddp_cpu trainer.strategy=ddp_spawn` under -m.

    (`strategy=ddp` re-launches `python -m mcl.train` with the sweep arguments: each child would
    start a sweep of its own.)
    """
    sweep = tmp_path / "sweep"
    args = ["-m", *SMALL, "trainer=ddp_cpu", "trainer.strategy=ddp_spawn", "trainer.max_epochs=1", "seed=0,1", f"hydra.sweep.dir={sweep}"]
    result = run_cli(args, cwd=tmp_path, env=ONE_THREAD)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0", "1"]
    assert result.stdout.count("== mcl summary ==") == 2  # one summary per job, none from a nested sweep
    for job in ("0", "1"):
        assert json.loads((sweep / job / "job.json").read_text())["status"] == "completed"
        assert final_knn(sweep / job)
        assert yaml.safe_load((sweep / job / "config_resolved.yaml").read_text())["trainer"]["devices"] == 2
    assert not (tmp_path / "multirun").exists() and not (tmp_path / "outputs").exists()


@pytest.mark.slow
def test_a_sweep_evaluated_in_one_command_reaches_the_report_and_resumes(tmp_path):
    """python -m mcl.eval.sweep over a real 2-job sweep: both jobs' kNN and linear results beside their
    last.ckpt, the report's table shows them as mean ± std, and a second call evaluates nothing again."""
    sweep = tmp_path / "sweep"
    args = ["-m", *MICRO, "trainer.max_epochs=1", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1", "seed=0,1"]
    result = run_cli([*args, f"hydra.sweep.dir={sweep}"], cwd=tmp_path, env=ONE_THREAD)
    assert result.returncode == 0, result.stderr[-3000:]
    evaluate = [sys.executable, "-m", "mcl.eval.sweep", f"dirs=[{sweep}]", "k=[20,200]", "t=[0.1]", "protocol=fast", "protocol.epochs=2"]
    evaluate += ["protocol.lr_search=true", "num_workers=0", "device=cpu"]  # lr 30 diverges on a width-8 network
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.run(evaluate, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    finals = {}
    for job in ("0", "1"):
        ckpt_dir = sweep / job / "checkpoints"
        knn = json.loads((ckpt_dir / "last.knn.json").read_text())
        linear = json.loads((ckpt_dir / "last.linear-fast.json").read_text())
        assert [(r["k"], r["t"]) for r in knn["grid"]] == [(20, 0.1), (200, 0.1)] and linear["epochs"] == 2
        finals[job] = (next(r["top1"] for r in knn["grid"] if r["k"] == 200), linear["best"]["top1"], linear["final"]["top1"])
    assert first.stdout.count(" done") == 4 and "4/4 evaluations have results" in first.stdout

    markdown = write_report(sweep).read_text()
    head = markdown.split("## Results\n", 1)[1].split("\n")[1]
    assert head.startswith("| group | runs | kNN top-1 (%) |")
    assert "offline 200-NN top-1 (%) | linear (fast) top-1, best test epoch (%) | linear (fast) top-1, final epoch (%) |" in head
    assert "memory" not in head and "queries" not in head  # counts: a table of their own
    assert "| kNN monitor: train images voting | kNN monitor: test images scored |" in markdown.split("## Counts", 1)[1]
    row = table_rows(markdown, "Results")[0]
    assert len(row) == 8
    for cell, values in zip(row[-3:], zip(*finals.values())):
        assert cell == f"{100 * np.mean(values):.2f} ± {100 * np.std(values, ddof=1):.2f}"  # both jobs' results, mean ± std
    mtimes = {p: p.stat().st_mtime_ns for p in sweep.rglob("last.*.json")}

    again = subprocess.run(evaluate, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and again.stdout.count(" skipped") == 4 and " done" not in again.stdout  # resume: nothing redone
    assert {p: p.stat().st_mtime_ns for p in sweep.rglob("last.*.json")} == mtimes
    other = subprocess.run(
        [*evaluate, "knn=false", "protocol.epochs=3"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert other.returncode == 0 and other.stdout.count(" done") == 2  # other settings: a new result beside the first
    assert all((sweep / job / "checkpoints" / "last.linear-fast.2.json").is_file() for job in ("0", "1"))


def test_a_sweep_evaluation_of_nothing_is_one_clear_error(tmp_path):
    from omegaconf import OmegaConf

    from mcl.eval.common import EvalError
    from mcl.eval.sweep import evaluate_runs

    for dirs, message in (([str(tmp_path / "nowhere")], "is not a directory"), ([], "dirs is empty"), ([str(tmp_path)], "holds no jobs")):
        with pytest.raises(EvalError, match=message):
            evaluate_runs(OmegaConf.create({"dirs": dirs}))
    result = subprocess.run(
        [sys.executable, "-m", "mcl.eval.sweep", f"dirs=[{tmp_path / 'nowhere'}]"], capture_output=True, text=True, cwd=tmp_path
    )
    assert result.returncode == 2 and "mcl.eval.sweep: " in result.stderr and "Traceback" not in result.stderr
