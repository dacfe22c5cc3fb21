"""Shared fixtures: the real config composed small, and tiny datasets in real on-disk formats."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from mcl.train import CONF_DIR

REPO = Path(__file__).resolve().parent.parent
TINY = ["debug=tiny", "logger=none", "dataset=digits"]


def make_cfg(overrides: list[str], output_dir: Path) -> DictConfig:
    """Compose conf/train.yaml as the CLI does, writing into output_dir."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("train", overrides=[*overrides, f"paths.output_dir={output_dir}"])


@pytest.fixture
def cfg_factory(tmp_path):
    return lambda overrides=(): make_cfg(list(overrides), tmp_path / "run")


def run_cli(args: list[str], cwd: Path, timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m mcl.train ARGS` as a user runs it; output captured as text."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "disabled", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "mcl.train", *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout
    )


def learnable_images(n: int, size: int = 32, num_classes: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """uint8 N x size x size x 3 images whose class is a colour and a stripe orientation."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, num_classes, n)
    palette = rng.integers(40, 215, (num_classes, 3))
    grid = np.arange(size)
    x = np.empty((n, size, size, 3), dtype=np.uint8)
    for i, c in enumerate(y):
        stripes = ((grid[:, None] if c % 2 else grid[None, :]) // 4 % 2) * np.ones((size, size))
        img = palette[c][None, None, :] * (0.6 + 0.4 * stripes[..., None]) + rng.normal(0, 12, (size, size, 3))
        x[i] = np.clip(img, 0, 255).astype(np.uint8)
    return x, y.astype(np.int64)


@pytest.fixture
def npz_file(tmp_path) -> Path:
    """A small learnable dataset in the npz format (x_train/y_train/x_test/y_test)."""
    x, y = learnable_images(320)
    path = tmp_path / "tiny.npz"
    np.savez(path, x_train=x[:256], y_train=y[:256], x_test=x[256:], y_test=y[256:])
    return path
