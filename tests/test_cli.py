"""`python -m mcl.train` as a user runs it, in a subprocess."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from tests.conftest import TINY, run_cli


def read_metrics(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv") as f:
        return list(csv.DictReader(f))


def test_cli_trains_writes_the_run_dir_and_prints_a_summary(tmp_path, npz_file):
    run_dir = tmp_path / "run"
    args = ["debug=tiny", "dataset=npz", f"dataset.path={npz_file}", "trainer.max_epochs=1", f"hydra.run.dir={run_dir}"]
    result = run_cli(args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "== mcl summary ==" in result.stdout and f"output dir:        {run_dir}" in result.stdout
    knn = [float(r["val/knn_top1"]) for r in read_metrics(run_dir) if r.get("val/knn_top1")]
    assert len(knn) == 1 and 0.0 <= knn[0] <= 1.0
    assert (run_dir / "checkpoints" / "last.ckpt").is_file() and (run_dir / "config_resolved.yaml").is_file()
    assert f"last checkpoint:   {run_dir / 'checkpoints' / 'last.ckpt'}  (the final weights)" in result.stdout


def test_unknown_strategy_is_hydras_own_error(tmp_path):
    result = run_cli(["mining.negative=no_such_rule", *TINY], cwd=tmp_path)
    assert result.returncode != 0
    assert "Could not find 'mining.negative/no_such_rule'" in result.stderr and "Available options" in result.stderr


def test_multirun_over_dotted_strategies_gives_each_job_a_dir(tmp_path):
    sweep = tmp_path / "sweep"
    args = ["-m", "mining.negative=all", "mining.positive=none", "seed=1,2", *TINY, "trainer.max_epochs=1", f"hydra.sweep.dir={sweep}"]
    result = run_cli(args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0", "1"]
    assert all((sweep / job / "config_resolved.yaml").is_file() for job in ("0", "1"))


@pytest.mark.slow
def test_wandb_without_api_key_runs_offline_and_never_prompts(tmp_path):
    run_dir = tmp_path / "run"
    env = {"HOME": str(tmp_path), "WANDB_MODE": None, "WANDB_API_KEY": None, "WANDB_DIR": str(tmp_path)}
    args = [*TINY, "logger=wandb", "trainer.max_epochs=1", f"hydra.run.dir={run_dir}"]
    result = run_cli(args, cwd=tmp_path, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "logging offline" in result.stdout
    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))


@pytest.mark.slow
def test_debug_fast_writes_nothing(tmp_path):
    """debug=fast says it writes nothing: no run dir (no .hydra/, job.json, config, checkpoint, log) is left."""
    args = ["dataset=digits", "debug=fast", "dataset.image_size=16", "backbone.width=8", "data.batch_size=16", "model.queue_size=128"]
    result = run_cli(args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "output dir:        none: trainer.fast_dev_run (debug=fast) writes nothing" in result.stdout
    assert "last checkpoint:   none written" in result.stdout
    assert list(tmp_path.iterdir()) == []
