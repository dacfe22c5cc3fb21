"""Shared fixtures: the real config composed small, and tiny datasets in real on-disk formats."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # tiny models: one thread a process beats oversubscribed cores

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from mcl.train import CONF_DIR

REPO = Path(__file__).resolve().parent.parent
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
TINY = ["debug=tiny", "logger=none", "dataset=digits"]
# CPU-sized runs through the CLI: a width-8 ResNet-18 on 16 x 16 digits, 16 images a step, bank 128
MICRO = [
    "debug=tiny",
    "dataset=digits",
    "dataset.image_size=16",
    "backbone.width=8",
    "data.batch_size=16",
    "data.eval_batch_size=128",
    "model.queue_size=128",
]


def make_cfg(overrides: list[str], output_dir: Path) -> DictConfig:
    """Compose conf/train.yaml as the CLI does, writing into output_dir."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("train", overrides=[*overrides, f"paths.output_dir={output_dir}"])


@pytest.fixture
def cfg_factory(tmp_path):
    return lambda overrides=(): make_cfg(list(overrides), tmp_path / "run")


def run_cli(args: list[str], cwd: Path, timeout: int = 600, env: dict[str, str | None] | None = None) -> subprocess.CompletedProcess:
    """`python -m mcl.train ARGS` as a user runs it, without a terminal (stdin closed); output captured as text."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "disabled", **(env or {})}
    full_env = {k: v for k, v in full_env.items() if v is not None}  # None unsets a variable
    return subprocess.run(
        [sys.executable, "-m", "mcl.train", *args],
        cwd=cwd,
        env=full_env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def learnable_images(n: int, size: int = 32, num_classes: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """uint8 N x size x size x 3 images: the class is a stripe pattern (horizontal, vertical,
    diagonal, checkerboard), drawn in random colours at a random phase. Colour is a nuisance that
    dominates raw and random-network features; augmentation-invariant features see the pattern."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, num_classes, n)
    r, c = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    x = np.empty((n, size, size, 3), dtype=np.uint8)
    for i, label in enumerate(y):
        period, phase = rng.integers(6, 10), rng.integers(0, 8)
        coords = [r, c, r + c, None][label % 4]
        on = ((r + phase) // period + (c + phase) // period) % 2 if coords is None else (coords + phase) // period % 2
        fg, bg = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
        img = np.where(on[..., None] == 1, fg, bg) + rng.normal(0, 10, (size, size, 3))
        x[i] = np.clip(img, 0, 255).astype(np.uint8)
    return x, y.astype(np.int64)


@pytest.fixture
def npz_file(tmp_path) -> Path:
    """A small learnable dataset in the npz format (x_train/y_train/x_test/y_test)."""
    x, y = learnable_images(320)
    path = tmp_path / "tiny.npz"
    np.savez(path, x_train=x[:256], y_train=y[:256], x_test=x[256:], y_test=y[256:])
    return path
