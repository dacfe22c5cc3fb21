"""Both notebooks execute (nbclient) against a tiny sweep and one of its checkpoints, made here.

Jupyter starts a kernel in the notebook's folder: the ablation notebook runs from notebooks/,
given a path relative to that folder; the gallery runs from elsewhere with a path relative to there.
Neither changes its working directory.
"""

from __future__ import annotations

import os
from pathlib import Path

import nbformat
import pytest
from conftest import MICRO, REPO, run_cli
from nbclient import NotebookClient
from omegaconf import OmegaConf

from mcl.records import with_run_paths

SMALL = [
    *MICRO,
    "trainer.limit_train_batches=4",
    "trainer.limit_val_batches=1",
]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    """A 2-job sweep: MoCo's negatives and the paper's gradient band (4 steps fill the 128-key bank)."""
    root = tmp_path_factory.mktemp("notebooks")
    args = ["-m", *SMALL, "trainer.max_epochs=2", "mining.negative=all,gradient", f"hydra.sweep.dir={root / 'sweep'}"]
    result = run_cli(args, cwd=root, env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    return root / "sweep"


def execute(name: str, parameters: str, cwd: Path, monkeypatch) -> nbformat.NotebookNode:
    """Run notebooks/<name> top to bottom with its `parameters` cell replaced."""
    nb = nbformat.read(REPO / "notebooks" / name, as_version=4)
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    cell.source = parameters
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the kernel inherits it
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}).execute()
    return nb


def outputs(nb: nbformat.NotebookNode, mime: str) -> list:
    return [o["data"][mime] for c in nb.cells if c.cell_type == "code" for o in c.outputs if mime in o.get("data", {})]


def text(nb: nbformat.NotebookNode) -> str:
    return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)


@pytest.mark.slow
def test_gallery_notebook_draws_a_checkpoint_mining(sweep, tmp_path, monkeypatch):
    ckpt = os.path.relpath(sweep / "1" / "checkpoints" / "last.ckpt", tmp_path)  # the gradient-band job, from where it runs
    nb = execute("mined_gallery.ipynb", f'CKPT = "{ckpt}"\nNUM_QUERIES = 3\nSEED = 0\nSTATS_QUERIES = 8', tmp_path, monkeypatch)
    assert len(outputs(nb, "image/png")) == 1  # the panel
    printed = text(nb)
    assert "negatives: GradientBandNegatives" in printed and "full: True" in printed
    assert "kept " in printed and "dropped " in printed and "chance (1/classes)      0.100" in printed


@pytest.mark.slow
def test_ablation_notebook_started_in_its_folder_reads_paths_from_there(sweep, monkeypatch):
    sweep_dir = os.path.relpath(sweep, REPO / "notebooks")  # relative to where Jupyter runs it
    nb = execute(
        "ablation.ipynb", f'SWEEP_DIR = "{sweep_dir}"\nAVERAGE_OVER = ("seed",)', REPO / "notebooks", monkeypatch
    )  # where Jupyter starts it
    table = "".join(outputs(nb, "text/markdown"))
    assert "2 jobs: 2 completed, 0 failed" in table
    assert "| mining.negative | runs | kNN top-1 (%) |" in table and "| all | 1/1 |" in table and "| gradient | 1/1 |" in table
    assert len(outputs(nb, "image/png")) == 3  # accuracy, kNN over epochs, mining diagnostics


def test_a_runs_relative_data_paths_read_from_where_that_run_started(tmp_path):
    """A notebook or script elsewhere reads a run's data where the run read it (`data` under its launch folder)."""
    run_dir = tmp_path / "outputs" / "run"
    (run_dir / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create({"hydra": {"runtime": {"cwd": str(tmp_path / "lab")}}}), run_dir / ".hydra" / "hydra.yaml")
    cfg = OmegaConf.create({"dataset": {"root": "data", "source": {"root": "data", "cache_dir": "/scratch/c"}}, "x": "data"})
    fixed = with_run_paths(cfg, run_dir)
    assert fixed.dataset.root == fixed.dataset.source.root == str(tmp_path / "lab" / "data")
    assert fixed.dataset.source.cache_dir == "/scratch/c" and fixed.x == "data" and cfg.dataset.root == "data"  # the rest as it was
    assert with_run_paths(cfg, tmp_path / "no_record").dataset.root == "data"  # no launch folder recorded: unchanged
