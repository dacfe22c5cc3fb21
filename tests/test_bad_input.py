"""Bad configuration and bad data: one clear error from `build` (or Hydra's composition), before training.

Every case here is a row of the table "What a bad input gets" in docs/reliability.md.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY, make_cfg
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf import OmegaConf
from PIL import Image

from mcl.data.sources import DatasetError
from mcl.data.sources import image_folder as image_folder_source
from mcl.reliability import CheckpointError
from mcl.train import ConfigError, build, train


def build_with(tmp_path: Path, *overrides: str):
    return build(make_cfg([*TINY, *overrides], tmp_path / "run"))


# --- configuration -------------------------------------------------------------------------
@pytest.mark.parametrize(
    "overrides, error, message",
    [
        (["optim.lr=-0.1"], ConfigError, r"optim.lr must be > 0, got -0.1"),
        (["optim.lr=fast"], ConfigError, r"optim.lr must be a number, got 'fast'"),
        (["optim.weight_decay=-1e-4"], ConfigError, r"optim.weight_decay must be >= 0"),
        (["model.temperature=0"], ConfigError, r"model.temperature must be > 0, got 0"),
        (["model.momentum=1.0"], ConfigError, r"model.momentum .* must lie in \[0, 1\), got 1.0; 1 freezes the key encoder"),
        (["model.momentum_schedule=linear"], ConfigError, r"model.momentum_schedule must be 'const' or 'cosine'"),
        (["monitor.knn_k=0"], ConfigError, r"monitor.knn_k must be >= 1"),
        (
            ["model.queue_size=100"],
            ConfigError,
            r"model.queue_size=100 must be a multiple of the keys enqueued per step, one key an image: .* = 32",
        ),
        (
            ["data.batch_size=2048", "model.queue_size=4096"],
            DatasetError,
            r"data.batch_size=2048 .* larger than the \d+ training images of dataset digits",
        ),
        (["backbone.width=0"], ValueError, r"backbone.width must be a positive integer, got 0"),
        (["data.key_view=medium"], ValueError, r"data.key_view must be 'strong' or 'weak'"),
        (["ckpt_path=x.ckpt", "auto_resume=true"], ConfigError, r"either ckpt_path .* or auto_resume=true, not both"),
        (["auto_resume=true", "callbacks=none"], ConfigError, r"auto_resume=true .* no callback writes any"),
        (["ckpt_path=/nonexistent/last.ckpt"], CheckpointError, r"ckpt_path=/nonexistent/last.ckpt: no such file"),
        (["trainer.precision=17"], ValueError, r"[Pp]recision .*17"),
        (
            ["model.candidates=queue", "callbacks=none"],
            ValueError,
            r"model.candidates must be 'bank' \(MoCo\), 'batch' \(SimCLR\) or 'neighbours' \(NNCLR, SNCLR\)",
        ),
        (["model.candidates=batch"], ConfigError, r"callbacks.mining_panel draws the bank's neighbours, .* ~callbacks.mining_panel"),
        (["experiment=simclr", "mining.negative.exclude_self=false"], ConfigError, r"mining.negative.exclude_self must stay true"),
    ],
)
def test_bad_config_is_one_clear_error_before_training(tmp_path, overrides, error, message):
    with pytest.raises(error, match=message):
        build_with(tmp_path, *overrides)


def test_in_batch_knobs_are_checked_against_the_batch_before_training(tmp_path):
    """With model.candidates=batch the candidates are 2 x 32 (debug=tiny's batch) x 1 device: topk 100 cannot run."""
    cfg = make_cfg([*TINY, "experiment=simclr", "mining.positive=soft", "mining.positive.topk=100"], tmp_path / "run")
    with pytest.raises(
        ConfigError, match=r"^mining.positive.topk=100 must lie in \[1, 64\].*\[64 candidates a query, from model.candidates=batch: 2 views"
    ):
        train(cfg)
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("override", ["dataset=cifar11", "mining.negative=nope", "backbone=resnet7"])
def test_unknown_group_option_is_hydras_error(tmp_path, override):
    group, choice = override.split("=")
    with pytest.raises(MissingConfigException, match=f"Could not find '{group}/{choice}'"):
        build_with(tmp_path, override)


def test_knob_of_another_strategy_is_hydras_error(tmp_path):
    with pytest.raises(ConfigCompositionException, match=r"Could not override 'mining.positive.topk'"):
        build_with(tmp_path, "mining.positive=none", "mining.positive.topk=5")


def test_mandatory_value_left_unset(tmp_path):
    with pytest.raises(ConfigError, match="Missing mandatory value: dataset.path"):
        build_with(tmp_path, "dataset=npz")


def test_checkpoint_of_another_architecture(tmp_path):
    _, model, _ = build_with(tmp_path, "backbone.width=8")
    path = tmp_path / "w8.ckpt"
    torch.save({"state_dict": model.state_dict(), "loops": {}, "optimizer_states": [], "global_step": 0, "epoch": 0}, path)
    with pytest.raises(
        CheckpointError, match=r"w8.ckpt does not fit this config's model: .*backbone.conv1.weight: \(8, 3, 3, 3\) in the checkpoint"
    ):
        build_with(tmp_path, f"ckpt_path={path}")


def test_a_file_that_is_not_a_training_checkpoint(tmp_path):
    path = tmp_path / "weights.ckpt"
    torch.save({"state_dict": {}}, path)
    with pytest.raises(CheckpointError, match=r"weights.ckpt is not a training checkpoint of mcl: it lacks \['loops'"):
        build_with(tmp_path, f"ckpt_path={path}")


# --- data ----------------------------------------------------------------------------------
def images(n: int, size: int = 8) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def write_npz(path: Path, **changes) -> Path:
    arrays = {"x_train": images(40), "y_train": np.arange(40) % 4, "x_test": images(8), "y_test": np.arange(8) % 4, **changes}
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
    return path


NPZ = ["dataset=npz", "dataset.image_size=8", "data.batch_size=8", "model.queue_size=64"]


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"y_test": None}, r"missing arrays \['y_test'\]"),
        ({"x_train": images(40).astype(np.float32)}, r"images must be uint8 in \[0, 255\], got dtype float32"),
        ({"x_train": np.zeros((40, 8, 8, 4), np.uint8)}, r"images must be N x H x W x 3 \(or N x H x W\), got shape \(40, 8, 8, 4\)"),
        ({"y_train": np.arange(39)}, r"labels must be a vector of length 40, got shape \(39,\)"),
        ({"y_train": np.linspace(0, 3, 40)}, r"labels must be integers, got dtype float64"),
        ({"y_train": np.full(40, -3)}, r"labels must be >= 0 \(-1 = unlabelled\), got -3"),
        ({"x_test": images(0), "y_test": np.zeros(0, np.int64)}, r"test: holds no images"),
    ],
)
def test_bad_npz_is_one_clear_error_before_training(tmp_path, changes, message):
    path = write_npz(tmp_path / "d.npz", **changes)
    with pytest.raises(DatasetError, match=message):
        build_with(tmp_path, *NPZ, f"dataset.path={path}")


def test_labels_beyond_the_declared_classes(tmp_path):
    path = write_npz(tmp_path / "d.npz", y_train=np.arange(40) % 7)
    with pytest.raises(DatasetError, match=r"labels must lie in \[0, 4\) \(-1 = unlabelled\), got \[0, 6\]"):
        build_with(tmp_path, *NPZ, f"dataset.path={path}", "dataset.num_classes=4")


def test_missing_and_corrupt_npz_files(tmp_path):
    with pytest.raises(DatasetError, match=r"npz file not found: .*nothing.npz"):
        build_with(tmp_path, *NPZ, f"dataset.path={tmp_path / 'nothing.npz'}")
    corrupt = tmp_path / "corrupt.npz"
    corrupt.write_bytes(b"PK\x03\x04 this is not a zip archive")
    with pytest.raises(DatasetError, match=r"corrupt.npz: not a readable .npz file"):
        build_with(tmp_path, *NPZ, f"dataset.path={corrupt}")


def test_cifar_not_downloaded(tmp_path):
    with pytest.raises(DatasetError, match=r"cifar10 not found at .*cifar-10-batches-py.*dataset.download=true"):
        build_with(tmp_path, "dataset=cifar10", f"paths.data_dir={tmp_path / 'nowhere'}")


def image_folder(root: Path, sizes=((8, 8), (8, 8))) -> Path:
    """root/{train,val}/{a,b}/*.png, 8 training images per class."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("val", 2)):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                w, h = sizes[i % len(sizes)]
                Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / split / c / f"{i}.png")
    return root


FOLDER = ["dataset=imagefolder", "dataset.image_size=8", "data.batch_size=8", "model.queue_size=64"]


def test_image_folder_with_an_empty_class_folder(tmp_path):
    root = image_folder(tmp_path / "images")
    (root / "train" / "c").mkdir()
    (root / "val" / "c").mkdir()
    with pytest.raises(DatasetError, match=r"imagefolder: Found no valid file for the classes c"):
        build_with(tmp_path, *FOLDER, f"dataset.root={root}")


def test_image_folder_with_a_corrupt_image(tmp_path):
    root = image_folder(tmp_path / "images")
    (root / "train" / "b" / "3.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(DatasetError, match=r"imagefolder: .*train/b/3.png is not a readable image"):
        build_with(tmp_path, *FOLDER, f"dataset.root={root}")


def test_image_folder_without_val_or_with_other_classes(tmp_path):
    root = image_folder(tmp_path / "images")
    (root / "val" / "b").rename(root / "val" / "z")
    with pytest.raises(DatasetError, match=r"imagefolder: train and val have different class folders"):
        build_with(tmp_path, *FOLDER, f"dataset.root={root}")
    for f in (root / "val").rglob("*.png"):
        f.unlink()
    for d in sorted((root / "val").rglob("*"), reverse=True):
        d.rmdir()
    (root / "val").rmdir()
    with pytest.raises(DatasetError, match=r"imagefolder not found at .*val"):
        build_with(tmp_path, *FOLDER, f"dataset.root={root}")


def test_image_folder_images_read_without_a_read_only_array_warning(tmp_path):
    """PIL's buffer is read-only: torch.from_numpy on it warns "The given NumPy array is not writable"."""
    images = image_folder(tmp_path / "images")
    train_images, _ = image_folder_source(str(images), image_size=8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        image = train_images.image(0)
    assert image.shape == (3, 8, 8) and image.dtype == torch.uint8
    image += 1  # a tensor of its own, writable
    assert torch.equal(image - 1, torch.from_numpy(np.array(Image.open(train_images.paths[0]).convert("RGB"))).permute(2, 0, 1))


def test_image_folder_with_mixed_sizes_is_accepted(tmp_path):
    """Not an error: every view crops/resizes to dataset.image_size (a batch stacks fine)."""
    root = image_folder(tmp_path / "images", sizes=((8, 8), (13, 7), (20, 31)))
    datamodule, _, _ = build_with(tmp_path, *FOLDER, f"dataset.root={root}")
    view_q, view_k, index, label = next(iter(datamodule.train_dataloader()))
    assert view_q.shape == view_k.shape == (8, 3, 8, 8)
    assert next(iter(datamodule.val_dataloader()[0]))[0].shape == (16, 3, 8, 8)


# --- through the command line: one message in mcl's words, no traceback, no empty folder ---------------
def run_module(module: str, args: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "WANDB_MODE": "disabled", **(env or {})}
    if "HYDRA_FULL_ERROR" not in (env or {}):
        full_env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=cwd, env=full_env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300
    )


def folders(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_dir()}


@pytest.fixture(scope="module")
def truncated_run(tmp_path_factory) -> Path:
    """A run dir whose last.ckpt is cut short (a copy interrupted, a full disk), beside its config."""
    run_dir = tmp_path_factory.mktemp("truncated") / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    OmegaConf.save(make_cfg(TINY, run_dir), run_dir / "config_resolved.yaml", resolve=True)
    torch.save({"state_dict": {"w": torch.zeros(1000)}, "loops": {}, "optimizer_states": [], "global_step": 1, "epoch": 0}, run_dir / "x")
    (run_dir / "checkpoints" / "last.ckpt").write_bytes((run_dir / "x").read_bytes()[:3000])
    (run_dir / "x").unlink()
    return run_dir


TRUNCATED = r"last.ckpt is not a readable checkpoint \(corrupt or truncated"
CLI_MISTAKES = {
    "config": (
        "mcl.train",
        ["model.queue_size=100"],
        r"^ConfigError: model.queue_size=100 must be a multiple of the keys enqueued per step",
    ),
    "mining knob": (
        "mcl.train",
        ["mining.negative=gradient", "mining.negative.start=0.9"],
        r"^ConfigError: mining.negative.start=0.9, mining.negative.end=0.5: the band kept at the start of training needs "
        r"0 <= start < end <= 1.0 .*\[128 candidates a query, from the memory bank: model.queue_size=128\]",
    ),
    "data": ("mcl.train", ["dataset=cifar10", "paths.data_dir=data"], r"^DatasetError: cifar10 not found at data/cifar-10-batches-py"),
    "offline download": (
        "mcl.train",
        ["dataset=cifar10", "dataset.download=true", "paths.data_dir=data/shared"],
        r"^DatasetError: cifar10: dataset.download=true could not download into data/shared \(.*\); is there a network here\? "
        r"Download it on a machine that has one .* run without dataset.download=true",
    ),
    "checkpoint": ("mcl.train", ["ckpt_path={ckpt}"], "^CheckpointError: .*" + TRUNCATED),
    "checkpoint (knn)": ("mcl.eval.knn", ["ckpt_path={ckpt}"], "^CheckpointError: .*" + TRUNCATED),
    "checkpoint (export)": ("mcl.export", ["ckpt_path={ckpt}", "out=backbone.pt"], "^CheckpointError: .*" + TRUNCATED),
}


@pytest.mark.slow
@pytest.mark.parametrize("mistake", CLI_MISTAKES)
def test_a_users_mistake_through_the_cli_is_one_message_without_traceback_or_empty_folder(mistake, truncated_run, tmp_path):
    module, args, message = CLI_MISTAKES[mistake]
    ckpt = truncated_run / "checkpoints" / "last.ckpt"
    before = {str(p): p.read_bytes() for p in truncated_run.rglob("*") if p.is_file()}
    train_args = [*TINY, "logger=none"] if module == "mcl.train" else []
    offline = {"https_proxy": "http://127.0.0.1:9", "http_proxy": "http://127.0.0.1:9", "no_proxy": ""}  # no network, in any CI
    result = run_module(module, [*train_args, *(a.format(ckpt=ckpt) for a in args)], tmp_path, env=offline)
    assert result.returncode == 1
    assert "Traceback" not in result.stdout + result.stderr
    assert "Error executing job" not in result.stderr  # Hydra's line above the message
    errors = [line for line in result.stderr.splitlines() if "Error" in line]
    assert len(errors) == 1 and re.search(message, errors[0]), result.stderr[-2000:]
    assert folders(tmp_path) == set()  # no run dir (outputs/...), no data dir
    assert {str(p): p.read_bytes() for p in truncated_run.rglob("*") if p.is_file()} == before  # the named run untouched


@pytest.mark.slow
def test_hydra_full_error_still_shows_the_traceback(tmp_path):
    result = run_module("mcl.train", [*TINY, "logger=none", "model.queue_size=100"], tmp_path, env={"HYDRA_FULL_ERROR": "1"})
    assert result.returncode == 1
    assert "Traceback" in result.stderr and "mcl.train.ConfigError: model.queue_size=100 must be a multiple" in result.stderr
