"""Every config option composes, and every option that can run on a CPU runs a fast_dev_run."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from mcl.train import CONF_DIR, ConfigError, check_config, train
from tests.conftest import TINY, make_cfg
from tests.test_data import trusted, write_cifar, write_image_folder, write_stl10, write_tinyimagenet  # noqa: F401

FAST = [*TINY, "trainer.fast_dev_run=true"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (Path(CONF_DIR) / group).glob("*.yaml"))


def run_fast(tmp_path: Path, overrides: list[str]) -> dict:
    summary = train(make_cfg([*FAST, *overrides], tmp_path / "run"))
    assert summary["output_dir"] == str(tmp_path / "run")
    return summary


@pytest.mark.parametrize("group", ["mining.positive", "mining.negative"])
def test_every_mining_strategy_runs(tmp_path, group):
    for choice in options(group):
        summary = run_fast(tmp_path / choice, [f"{group}={choice}"])
        assert 0.0 <= summary["val/knn_top1"] <= 1.0, choice


def test_dotted_strategy_override_selects_the_file_and_sets_knobs(tmp_path):
    cfg = make_cfg(["mining.negative=all", "mining.negative.exclude_self=false"], tmp_path)
    assert cfg.mining.negative == OmegaConf.create({"_target_": "mcl.mining.base.AllNegatives", "exclude_self": False})


def test_a_string_where_a_strategy_belongs_is_an_error(tmp_path):
    cfg = make_cfg(FAST, tmp_path)
    cfg.mining.negative = "gradient"
    with pytest.raises(ConfigError, match=r"mining.negative must select a strategy file from conf/mining.negative/"):
        check_config(cfg, world_size=1)


@pytest.mark.parametrize("group", ["backbone", "logger", "callbacks", "debug"])
def test_every_option_of_the_group_runs(tmp_path, group, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    for choice in options(group):
        run_fast(tmp_path / choice, [f"{group}={choice}", "backbone.width=8"])


def test_every_experiment_preset_composes_and_runs_small(tmp_path):
    for choice in options("experiment"):
        cfg = make_cfg([f"experiment={choice}"], tmp_path / choice)
        assert cfg.mining.positive._target_ and cfg.mining.negative._target_
        # the same preset, shrunk to a CPU smoke test
        run_fast(tmp_path / choice, [f"experiment={choice}", "dataset=digits", "model.queue_size=256"])


def test_every_trainer_composes_and_the_cpu_ones_run(tmp_path):
    for choice in options("trainer"):
        cfg = make_cfg([f"trainer={choice}"], tmp_path / choice)
        assert cfg.trainer._target_ == "lightning.Trainer"
    for choice in ("default", "cpu"):
        run_fast(tmp_path / choice, [f"trainer={choice}", "trainer.accelerator=cpu"])


@pytest.mark.parametrize(
    "dataset,writer,extra",
    [
        ("cifar10", lambda root: write_cifar(root, "cifar10"), []),
        ("cifar100", lambda root: write_cifar(root, "cifar100"), []),
        ("stl10", write_stl10, ["data.batch_size=4", "model.queue_size=8"]),
        ("tinyimagenet", write_tinyimagenet, ["data.batch_size=2", "model.queue_size=8", "dataset.num_classes=2"]),
        ("imagefolder", write_image_folder, ["data.batch_size=2", "model.queue_size=8", "dataset.image_size=24", "model.bn_splits=1"]),
    ],
)
def test_every_dataset_trains(tmp_path, trusted, dataset, writer, extra):  # noqa: F811
    writer(tmp_path)
    root = "dataset.root" if dataset == "imagefolder" else "paths.data_dir"
    cache = f"paths.cache_dir={tmp_path / 'cache'}"
    run_fast(
        tmp_path,
        [f"dataset={dataset}", f"{root}={tmp_path}", cache, "data.batch_size=4", "model.queue_size=16", "model.bn_splits=2", *extra],
    )


def test_npz_dataset_trains(tmp_path, npz_file):
    run_fast(tmp_path, ["dataset=npz", f"dataset.path={npz_file}"])


def test_queue_not_a_multiple_of_the_keys_per_step(tmp_path):
    with pytest.raises(ConfigError, match=r"model.queue_size=100 must be a multiple .* = 32"):
        train(make_cfg([*FAST, "model.queue_size=100"], tmp_path))
