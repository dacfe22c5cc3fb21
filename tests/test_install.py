"""A wheel built from the repository carries the configs (conf/ ships as mcl/conf) and trains from any directory."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import REPO, run_cli

TOP_LEFT_OUT = {"outputs", "multirun", "data", "cache", "build", "reports", "wandb", "lightning_logs"}  # a checkout's run outputs


def left_out(folder: str, names: list[str]) -> set[str]:
    top = TOP_LEFT_OUT if Path(folder) == REPO else set()
    return {n for n in names if n in top or n == "__pycache__" or n.endswith(".egg-info") or n.startswith(".")}


@pytest.mark.slow
def test_a_wheel_installed_into_an_empty_target_trains_digits_from_another_directory(tmp_path):
    source = tmp_path / "source"  # a copy: building writes build/ and *.egg-info beside the sources
    shutil.copytree(REPO, source, ignore=left_out)
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(source)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stdout[-2000:] + build.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("mcl-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"mcl/conf/{p.relative_to(REPO / 'conf')}" for p in (REPO / "conf").rglob("*.yaml")} <= names  # every config
    assert {str(p.relative_to(REPO)) for p in (REPO / "mcl").rglob("*.py")} <= names  # every module (the package list is explicit)

    target = tmp_path / "target"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--target", str(target), str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert install.returncode == 0, install.stderr[-2000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target), "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}  # the target only, no checkout
    found = subprocess.run(
        [sys.executable, "-c", "import mcl.runtime as r; print(r.__file__); print(r.CONF_DIR)"],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
    )
    assert found.stdout.splitlines() == [str(target / "mcl" / "runtime.py"), str(target / "mcl" / "conf")], found.stderr
    run_dir = elsewhere / "run"
    args = ["dataset=digits", "debug=tiny", "dataset.image_size=16", "backbone.width=8", f"hydra.run.dir={run_dir}"]
    result = run_cli(args, cwd=elsewhere, env={"PYTHONPATH": str(target), "OMP_NUM_THREADS": "1"})  # os.environ plus these
    assert result.returncode == 0, result.stderr[-3000:]
    assert "== mcl summary ==" in result.stdout and (run_dir / "checkpoints" / "last.ckpt").is_file()
